"""QuantizationCallback under real DDP: two gloo processes (torchrun) train a W8A8 Llama with transformers.Trainer.

The ranks train on different shards (the Trainer's distributed sampler), so their observers see different
activations. With ``sync_observers`` (the default) they must end with identical ranges, and DDP keeps the
weights identical; the control run with ``sync_observers=False`` must end with ranges that differ, so the
test can fail.

This file is also the worker: the test launches
``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/hf/test_ddp.py DIR``, and each
rank writes ``DIR/rank<r>.pt``.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SEQ = 8
WORLD, BATCH, STEPS, CALIBRATION = 2, 2, 4, 2
EXAMPLES = WORLD * BATCH * STEPS  # one epoch: each example is seen once, by one rank


def _llama():
    import transformers
    from hf_tiny import llama_config

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(llama_config())


class _Tokens(torch.utils.data.Dataset):
    """``EXAMPLES`` random token sequences, the same on every rank; records the indices this process reads."""

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.ids = [torch.randint(0, 100, (SEQ,), generator=g) for _ in range(EXAMPLES)]
        self.read: list[int] = []

    def __len__(self):
        return EXAMPLES

    def __getitem__(self, i):
        self.read.append(int(i))
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _ranges(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from torchquant.distributed import observers

    return {n: (o.min_val.clone(), o.max_val.clone()) for n, o in observers(model)}


def _train(root: Path, sync: bool) -> dict:
    """One Trainer run on this rank: observer ranges after calibration and at the end, weights, data read."""
    import transformers

    from torchquant.distributed import observers
    from torchquant.hf import QuantizationCallback, TorchQuantConfig

    class Snapshot(transformers.TrainerCallback):
        """The ranges at the end of the calibration phase."""

        def __init__(self):
            self.ranges: dict = {}
            self.synced: list = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == CALIBRATION:
                self.ranges = _ranges(model)
                self.synced = [o.distributed_sync for _, o in observers(model)]

    model = transformers.AutoModelForCausalLM.from_pretrained(
        root / "model", quantization_config=TorchQuantConfig(weights="int8", activations="int8")
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(
        output_dir=str(root / f"out-{sync}"),
        use_cpu=True,
        ddp_backend="gloo",
        per_device_train_batch_size=BATCH,
        max_steps=STEPS,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    data, snapshot = _Tokens(), Snapshot()
    callbacks = [QuantizationCallback(calibration_steps=CALIBRATION, sync_observers=sync), snapshot]
    trainer = transformers.Trainer(model, args, train_dataset=data, callbacks=callbacks)
    trainer.train()
    return {
        "world_size": args.world_size,
        "ddp": type(trainer.model_wrapped).__name__,
        "synced": snapshot.synced,
        "synced_after": [o.distributed_sync for _, o in observers(model)],
        "calibrated": snapshot.ranges,
        "ranges": _ranges(model),
        "before": before,
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
        "read": data.read,
    }


def _worker(root: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    out = {sync: _train(root, sync) for sync in (True, False)}
    torch.save(out, root / f"rank{rank}.pt")


# ------------------------------------------------------------------ the test
def _differ(a, b) -> list[str]:
    """Names of the observers whose ranges differ between two ``_ranges`` results."""
    assert a.keys() == b.keys()
    return [n for n in a if not (torch.equal(a[n][0], b[n][0]) and torch.equal(a[n][1], b[n][1]))]


@pytest.mark.slow
def test_ranks_hold_identical_ranges_and_weights(tmp_path):
    pytest.importorskip("transformers")
    _llama().save_pretrained(tmp_path / "model")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD)]
    run = subprocess.run(
        [*torchrun, __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=180, cwd=ROOT
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    r0, r1 = ranks

    for sync in (True, False):
        a, b = r0[sync], r1[sync]
        assert a["world_size"] == b["world_size"] == WORLD
        assert a["ddp"] == "DistributedDataParallel"
        assert all(a["synced"]) is sync and all(b["synced"]) is sync and len(a["synced"]) > 0
        assert not any(a["synced_after"]) and not any(b["synced_after"])  # switched off at train end
        # the distributed sampler gave the ranks disjoint shards of the dataset
        assert len(a["read"]) == len(b["read"]) == BATCH * STEPS
        assert not set(a["read"]) & set(b["read"])
        # DDP keeps the weights identical, and training moved them
        assert a["weights"].keys() == b["weights"].keys()
        for n in a["weights"]:
            assert torch.equal(a["weights"][n], b["weights"][n]), (sync, n)
        assert any(not torch.equal(a["before"][n], a["weights"][n]) for n in a["weights"])
        assert a["calibrated"].keys() == a["ranges"].keys()  # the snapshot after calibration was taken
        assert all(a["ranges"][n][0].numel() > 0 for n in a["ranges"])  # every observer has ranges

    synced, alone = (r0[True], r1[True]), (r0[False], r1[False])
    # sync_observers: every observer holds the same ranges on both ranks, after calibration and at the end
    assert _differ(synced[0]["calibrated"], synced[1]["calibrated"]) == []
    assert _differ(synced[0]["ranges"], synced[1]["ranges"]) == []
    # the control: without it the ranks' activation ranges drift apart
    assert _differ(alone[0]["calibrated"], alone[1]["calibrated"])
    assert _differ(alone[0]["ranges"], alone[1]["ranges"])
    # calibration is float training, the same in both runs: the synchronised ranges cover what each rank saw
    for rank in alone:
        for n, (mn, mx) in rank["calibrated"].items():
            smn, smx = synced[0]["calibrated"][n]
            assert (smn <= mn).all() and (smx >= mx).all(), n


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
