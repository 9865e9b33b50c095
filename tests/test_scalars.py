"""Metrics to TensorBoard beside metrics.jsonl: the same numbers at the same steps (a fake writer stands in
for torch's SummaryWriter, tensorboard is not installed here), purged from the resume step on; without
tensorboard one note, once."""
import json
import warnings

from pixelrepa import scalars
from pixelrepa.train import TrainConfig, train


class FakeWriter:
    made = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def tiny(folder, out, steps):
    return TrainConfig(model="JiT-Ti/4", dataset=str(folder), resolution=16, data_dir=str(out.parent / "cache"),
                       out_dir=str(out), steps=steps, batch_size=8, blr=1e-2, warmup_epochs=1, ckpt_every=2,
                       log_every=1, num_samples=0, progress=False, ema_decays=(0.5, 0.7))


def test_every_logged_number_goes_to_tensorboard_at_its_step(tmp_path, image_folder, monkeypatch):
    monkeypatch.setattr(scalars, "writer_class", lambda: FakeWriter)
    FakeWriter.made.clear()
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(tiny(image_folder, out, 4))
        train(tiny(image_folder, out, 6))  # resumed from step 4
    first, second = FakeWriter.made
    assert first.log_dir == str(out / "tensorboard") and first.purge_step is None and first.closed
    assert second.purge_step == 4 and second.closed
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    want = [(k, v, r["step"]) for r in logged for k, v in r.items() if k != "step"]
    assert first.scalars + second.scalars == want
    assert {"loss", "lr", "images_per_s"} <= {tag for tag, _, _ in first.scalars}


def test_without_tensorboard_one_note(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(scalars, "_noted", False)
    assert scalars.writer_class() is None  # not installed in this environment
    assert scalars.open_writer(tmp_path) is None and scalars.open_writer(tmp_path) is None
    scalars.write(None, {"step": 1, "loss": 0.5})
    assert capsys.readouterr().err.count("tensorboard is not installed") == 1
    assert not (tmp_path / "tensorboard").exists()
