"""trainer.checkpoint: atomic folders, exact round trips without pickle, truncated folders never resumed."""

from __future__ import annotations

import json

import pytest
import torch

from trainer.checkpoint import (
    TrainState,
    flatten,
    is_complete,
    list_checkpoints,
    load_checkpoint,
    prune,
    resolve_resume,
    save_checkpoint,
    unflatten,
)

pytestmark = pytest.mark.quick


class Net(torch.nn.Module):
    """A stand-in for the ControlNet with diffusers' save_pretrained signature."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(70, 80), torch.nn.Linear(80, 3)

    def forward(self, x):
        return self.b(self.a(x).relu())

    def save_pretrained(self, folder, safe_serialization=True):
        from safetensors.torch import save_file

        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()},
                  str(folder / "diffusion_pytorch_model.safetensors"))


def trained(optimizer_name: str, steps: int = 3, seed: int = 0):
    """A net, its optimizer and scaler after a few steps."""
    torch.manual_seed(seed)
    net = Net()
    if optimizer_name == "adamw8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(net.parameters(), lr=1e-2, betas=(0.9, 0.99))
    else:
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=2**31 - 1)
    for _ in range(steps):
        loss = net(torch.randn(16, 70)).pow(2).mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    return net, opt, scaler


def step(net, opt, seed: int) -> None:
    """One more optimizer step on fixed data."""
    g = torch.Generator().manual_seed(seed)
    net(torch.randn(16, 70, generator=g)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def test_flatten_round_trip():
    """Nested dicts with int keys, tuples, tensors and scalars survive the JSON + tensors split."""
    obj = {"state": {0: {"step": torch.tensor(3.0), "m": torch.randn(4)}, 7: {"q": {"x": torch.ones(2, 2)}}},
           "groups": [{"betas": (0.9, 0.99), "lr": 1e-3, "name": None, "params": [0, 7]}]}
    tensors: dict = {}
    skeleton = flatten(obj, tensors)
    back = unflatten(json.loads(json.dumps(skeleton)), tensors)
    assert back["groups"][0]["betas"] == (0.9, 0.99) and back["groups"][0]["params"] == [0, 7]
    assert set(back["state"]) == {0, 7}
    assert torch.equal(back["state"][7]["q"]["x"], obj["state"][7]["q"]["x"])


@pytest.mark.parametrize("optimizer_name", ["adamw", "adamw8bit"])
def test_save_load_continues_exactly(tmp_path, optimizer_name):
    """Weights, optimizer (8-bit states too), scaler, RNG and counters: the next step is bit-identical."""
    net, opt, scaler = trained(optimizer_name)
    gen = torch.Generator().manual_seed(5)
    gen_draw = torch.randn(3, generator=torch.Generator().manual_seed(5))
    state = TrainState(step=3, batches=6, epoch=1, offset=2, failed_samples=1)
    path = save_checkpoint(tmp_path, state, net, opt, scaler, gen, {"seed": 0})
    assert path.name == "checkpoint-3" and is_complete(path)
    step(net, opt, 1)
    expected = {k: v.clone() for k, v in net.state_dict().items()}
    net2, opt2, scaler2 = trained(optimizer_name, steps=1, seed=9)  # other weights and state
    gen2 = torch.Generator().manual_seed(99)
    got = load_checkpoint(path, net2, opt2, scaler2, gen2)
    assert (got.step, got.batches, got.epoch, got.offset, got.failed_samples) == (3, 6, 1, 2, 1)
    assert torch.equal(torch.randn(3, generator=gen2), gen_draw)
    step(net2, opt2, 1)
    for k, v in net2.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert scaler2.state_dict() == scaler.state_dict()


def test_truncated_checkpoint_is_never_latest(tmp_path):
    """A newer folder with a truncated file, a missing manifest, or a leftover temp folder is skipped."""
    net, opt, scaler = trained("adamw")
    gen = torch.Generator()
    for s in (1, 2, 3):
        save_checkpoint(tmp_path, TrainState(step=s), net, opt, scaler, gen, {})
    weights = tmp_path / "checkpoint-3" / "controlnet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    (tmp_path / "checkpoint-9").mkdir()  # no manifest at all
    (tmp_path / ".tmp-checkpoint-10").mkdir()  # a save that crashed before its rename
    assert resolve_resume("latest", tmp_path) == tmp_path / "checkpoint-2"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2]
    with pytest.raises(FileNotFoundError):
        resolve_resume(str(tmp_path / "checkpoint-3"), tmp_path)
    assert resolve_resume("latest", tmp_path / "nothing-here") is None
    assert resolve_resume(None, tmp_path) is None


def test_prune_keeps_the_newest(tmp_path):
    """Retention removes the oldest complete checkpoints and stale temp folders, nothing else."""
    net, opt, scaler = trained("adamw", steps=1)
    for s in (5, 10, 15, 20):
        save_checkpoint(tmp_path, TrainState(step=s), net, opt, scaler, torch.Generator(), {})
    (tmp_path / ".tmp-checkpoint-25").mkdir()
    (tmp_path / "notes").mkdir()
    prune(tmp_path, 2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [15, 20]
    assert not (tmp_path / ".tmp-checkpoint-25").exists() and (tmp_path / "notes").exists()


def test_nothing_is_pickled(tmp_path):
    """The checkpoint holds only safetensors and JSON files."""
    net, opt, scaler = trained("adamw8bit", steps=1)
    path = save_checkpoint(tmp_path, TrainState(step=1), net, opt, scaler, torch.Generator(), {"a": 1})
    suffixes = {p.suffix for p in path.rglob("*") if p.is_file()}
    assert suffixes == {".json", ".safetensors"}


def saved_run(tmp_path, **changes):
    """A checkpoint written with a default TrainConfig, and a run config with `changes` applied."""
    from trainer.config import DataConfig, ModelConfig, TrainConfig

    def config(**kw):
        data = {"resolution": 512, "train_batch_size": 4, **{k: v for k, v in kw.items() if k in ("resolution",)}}
        return TrainConfig(output=str(tmp_path), data=DataConfig(shards="s/{0..1}.tar", **data),
                           model=ModelConfig(model="tiny"), seed=kw.get("seed", 0),
                           max_train_steps=kw.get("max_train_steps", 10_000)).to_dict()

    net, opt, scaler = trained("adamw")
    net.config = {}
    path = save_checkpoint(tmp_path, TrainState(step=3), net, opt, scaler, torch.Generator(), config())
    return path, net, opt, scaler, config(**changes)


def test_resume_with_another_resolution_names_the_flag(tmp_path):
    """--resolution 512 in the checkpoint, 256 now: the error says which flag and how to go on."""
    from trainer.checkpoint import ResumeMismatchError

    path, net, opt, scaler, now = saved_run(tmp_path, resolution=256, seed=1)
    with pytest.raises(ResumeMismatchError) as e:
        load_checkpoint(path, net, opt, scaler, torch.Generator(), config=now)
    msg = str(e.value)
    assert "--resolution 512 (now 256)" in msg and "--seed 0 (now 1)" in msg
    assert "rerun with --resolution 512 --seed 0 or start a new --output" in msg


def test_resume_may_change_step_counts(tmp_path):
    """Settings that do not change the run's meaning (here --max-train-steps) resume without complaint."""
    path, net, opt, scaler, now = saved_run(tmp_path, max_train_steps=20_000)
    assert load_checkpoint(path, net, opt, scaler, torch.Generator(), config=now).step == 3


def test_resume_into_another_model_shape_names_the_model(tmp_path):
    """A real diffusers ControlNet of another shape: the error names --model, not a tensor size."""
    from diffusers import ControlNetModel

    from trainer.checkpoint import ResumeMismatchError, check_resume
    from trainer.config import DataConfig, ModelConfig, TrainConfig

    def controlnet(channels):
        return ControlNetModel(block_out_channels=channels, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                               layers_per_block=1, cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
                               conditioning_embedding_out_channels=(8, 16))

    config = TrainConfig(output=str(tmp_path), data=DataConfig(shards="s.tar"),
                         model=ModelConfig(model="models/tiny-a")).to_dict()
    old = controlnet((32, 64))
    opt = torch.optim.AdamW(old.parameters())
    scaler = torch.amp.GradScaler("cpu")
    path = save_checkpoint(tmp_path, TrainState(step=1), old, opt, scaler, torch.Generator(), config)
    check_resume(path, config, old.config)  # the same shape passes
    with pytest.raises(ResumeMismatchError, match=r"block_out_channels \[32, 64\] \(now \[16, 32\]\).*--model models/tiny-a"):
        check_resume(path, config, controlnet((16, 32)).config)


def test_a_resume_keeps_the_log_up_to_its_step_past_a_torn_line(tmp_path):
    """A line cut short (power loss, full disk) must not stop the resume: records past the checkpoint and
    anything unreadable are dropped, the rest kept."""
    from trainer.metrics import RunLog

    log = tmp_path / "train_log.jsonl"
    records = [json.dumps({"step": s, "loss": 0.1 * s}) for s in (1, 2, 3)]
    log.write_text("\n".join(records) + '\n{"step": 4, "lo')
    RunLog(tmp_path, start_step=2, total_steps=5, enable_bar=False).close()
    assert log.read_text().splitlines() == records[:2]
