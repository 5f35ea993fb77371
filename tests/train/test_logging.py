"""A training stage leaves a PNG loss plot and TensorBoard scalars (read back from the event file) beside its
metrics.jsonl."""

import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402
from mamba_llama_jax.config import CheckpointConfig  # noqa: E402
from mamba_llama_jax.data import pipeline  # noqa: E402
from mamba_llama_jax.train import trainer  # noqa: E402


def _scalars(event_file: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a TFRecord event file (length, crc, payload, crc), parsed with tensorboardX's protos."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    data = event_file.read_bytes()
    i = 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        ev = Event.FromString(data[i + 12:i + 12 + n])
        i += 12 + n + 4
        for v in ev.summary.value:
            out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_loss_plot_and_tensorboard_scalars(tmp_path):
    t = tiny.teacher(scale=3.0)
    h = tiny.hybrid(t)
    st = tiny.stage(steps=4)
    data = pipeline.build_dataset(tiny.token_examples(), tiny.PadTok(), st.data, batch_size=st.batch_size)
    res = trainer.fit(st, h, t, data, out_dir=tmp_path, log_every=1, progress=False,
                      checkpoint=CheckpointConfig(every=100, async_save=False))
    png = tmp_path / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    sc = _scalars(events[0])
    assert [s for s, _ in sc["lw/loss"]] == [1, 2, 3, 4]
    losses = [r["loss"] for r in res.metrics]
    assert all(abs(v - x) <= 1e-6 * abs(x) for (_, v), x in zip(sc["lw/loss"], losses))  # float32 in the file
    assert {"lw/grad_norm", "lw/lr", "lw/tokens_per_s"} <= set(sc)
