"""The demo model's vision tower keeps what each image token shows while it trains.

Trained on the language-model loss alone, the tower collapsed within a hundred steps to one large
embedding shared by every image token (the weights of training runs 1-3 ended there, and their
answers did not depend on the image at all). `--patch-lr` and `--center-weight` prevent it; the
last test trains the same steps with and without them and measures the spread of the embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glmv.synth import FontsMissingError

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

CHECKPOINT = Path(__file__).resolve().parents[2] / "glmv" / "checkpoints" / "glmv-demo"


def test_common_share_is_one_for_identical_tokens_and_zero_for_opposite_ones() -> None:
    from training.model import common_share

    v = torch.tensor([3.0, -4.0])
    assert common_share(v.repeat(5, 1)).item() == pytest.approx(1.0)
    assert common_share(torch.stack([v, -v])).item() == pytest.approx(0.0)
    # half of the energy shared: rows (1, 1) and (1, -1) have mean (1, 0)
    assert common_share(torch.tensor([[1.0, 1.0], [1.0, -1.0]])).item() == pytest.approx(0.5)


def test_only_the_patch_embedding_gets_its_own_learning_rate() -> None:
    from training.train_demo import _in_patch_embedding

    assert _in_patch_embedding("model.visual.patch_embed.proj.weight")
    assert not _in_patch_embedding("model.visual.blocks.0.attn.qkv.weight")
    assert not _in_patch_embedding("model.visual.merger.proj.weight")
    assert not _in_patch_embedding("model.language_model.layers.0.mlp.down_proj.weight")


@pytest.fixture(scope="module")
def fonts() -> None:
    from glmv.synth.fonts import find_fonts

    try:
        find_fonts()
    except FontsMissingError as exc:  # pragma: no cover
        pytest.skip(str(exc))


def _train(out: Path, *extra: str) -> list[dict[str, float]]:
    from training.train_demo import main

    argv = [
        "--out", str(out), "--skeleton", str(CHECKPOINT), "--device", "cpu", "--workers", "0",
        "--lines-share", "1.0", "--tokens", "4096", "--patches", "8192", "--max-steps", "75",
        "--time-budget", "0", "--lr", "1.5e-3", "--warmup", "50", "--eval-seconds", "0", *extra,
    ]  # fmt: skip
    assert main(argv) == 0
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_the_vision_tower_collapses_without_the_fixes_and_not_with_them(fonts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    threads = torch.get_num_threads()  # the in-process document stream sets one thread
    try:
        plain = _train(tmp_path / "plain")
        fixed = _train(tmp_path / "fixed", "--patch-lr", "0.03", "--center-weight", "1")
    finally:
        torch.set_num_threads(threads)
    # the same steps, data and initialisation; measured on the batch of step 75 (a new tower: 0.48)
    assert plain[-1]["step"] == fixed[-1]["step"] == 75
    assert plain[-1]["vision_spread"] < 0.05
    assert fixed[-1]["vision_spread"] > 0.5
