"""benchmarks/speechbrain.py --quick: every row of the table runs on a tiny synthesised set.

The full run (the accuracy targets) is the benchmark itself; here each row must produce an
accuracy from a model in the mode its method names, and the table must name the targets.
"""

import shutil

import benchmark_script
import pytest

pytest.importorskip("speechbrain", reason="needs speechbrain (torchquant[speechbrain])")
pytest.importorskip("torchaudio", reason="needs torchaudio (torchquant[speechbrain])")

bench = benchmark_script.load("speechbrain")

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng on PATH"),
]


@pytest.mark.slow
def test_quick_run_fills_every_row_and_writes_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCHQUANT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "table.md"
    rows = bench.main(["--quick", "--threads", "1", "--out", str(out)])
    assert [(r["bits"], r["method"]) for r in rows] == [("float", "float")] + [
        (f"W{w}A{a}", m) for w, a in bench.BITS for m in bench.METHODS[f"W{w}A{a}"]
    ]
    assert all(0.0 <= r["accuracy"] <= 100.0 for r in rows)
    assert all(abs(r["drop"] - (rows[0]["accuracy"] - r["accuracy"])) < 1e-9 for r in rows)
    table = out.read_text().splitlines()
    assert table[0] == "| weights/acts | PTQ | PTQ + AdaRound | QAT | target |"
    assert [line.split(" | ")[0] for line in table[2:]] == ["| float", "| W8A8", "| W4A8", "| W4A4"]
    assert "PTQ within 1: " in table[3] and "QAT within 3: " in table[5]
    assert (tmp_path / "cache" / "speech_digits" / bench.QUICK_RECIPE.key() / "data.pt").exists()
    assert "W4A4 qat:" in capsys.readouterr().out


def test_markdown_marks_the_targets():
    rows = [dict(bits="float", method="float", accuracy=90.0, drop=0.0, seconds=0.0)]
    for w, a in bench.BITS:
        for m, acc in (("ptq", 89.5), ("ptq+adaround", 89.0), ("qat", 86.0)):
            if m in bench.METHODS[f"W{w}A{a}"]:
                rows.append(dict(bits=f"W{w}A{a}", method=m, accuracy=acc, drop=90.0 - acc, seconds=0.0))
    table = bench.markdown(rows).splitlines()
    assert table[3] == "| W8A8 | 89.50 | - | 86.00 | PTQ within 1: PASS (+0.50) |"
    assert table[5] == "| W4A4 | 89.50 | 89.00 | 86.00 | QAT within 3: FAIL (+4.00) |"
