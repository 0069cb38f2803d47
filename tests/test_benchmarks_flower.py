"""benchmarks/flower.py --quick: ten clients, two rounds, the table and its files; the split is non-IID."""

import json

import benchmark_script
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("flwr")

bench = benchmark_script.load("flower")


def test_dirichlet_split_partitions_the_data_non_iid():
    y = torch.arange(10).repeat_interleave(50)
    parts = bench.dirichlet_split(y, 10, 0.5, seed=0)
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(len(y)))  # every example once
    assert min(len(p) for p in parts) >= 10
    shares = torch.stack([torch.bincount(y[p], minlength=10) / len(p) for p in parts])
    assert shares.max() > 0.3  # some client is dominated by one class (IID would give about 0.1)


def test_quick_run_prints_the_table_and_writes_csv_and_json(tmp_path, capsys):
    n = torch.get_num_threads()
    try:
        results = bench.main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(n)
    out = capsys.readouterr().out
    assert "| model | updates |" in out and "10 clients" in out
    assert [(r.model, r.updates) for r in results] == [(m, u or "float32") for m, u, _ in bench.QUICK_ROWS]
    by = {(r.model, r.updates, r.rounding): r for r in results}
    float_row, int8_row = by[("float32", "float32", "-")], by[("float32", "int8", "nearest")]
    assert 0.2 < int8_row.bytes_up / float_row.bytes_up < 0.3  # codes + one scale per row
    assert by[("float32", "int2", "stochastic")].bytes_up < int8_row.bytes_up / 3
    assert (tmp_path / "results.csv").read_text().startswith("model,updates,rounding,accuracy,loss")
    assert len(json.loads((tmp_path / "results.json").read_text())) == len(results)
