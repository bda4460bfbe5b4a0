import os

import pytest
import torch

from stages.train.networks import create_network, flat_params, num_params
from distill.buffer import EXPERT_FORMAT, ExpertBuffer, ExpertFormatError, expert_path, load_expert, save_expert
from distill.trajectories import build_expert_buffer, expert_recipe, train_expert

NET = {"width": 8, "depth": 2}
KW = {"width": 8, "depth": 2, "norm": "instancenorm"}  # mtt-expert's network_kwargs with NET merged in


def recipe(**kw):
    return expert_recipe(network_kwargs=NET, **{"epochs": 3, "batch_size": 32, **kw})


def data(n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g), torch.arange(n) % 4


@pytest.fixture(scope="module")
def expert():
    return train_expert(*data(), num_classes=4, seed=5, recipe=recipe())


def test_expert_protocol_recipe():
    r = expert_recipe()
    assert (r.network, r.optimizer, r.lr, r.momentum, r.weight_decay, r.batch_size, r.epochs) == \
        ("convnet", "sgd", 0.01, 0.0, 0.0, 256, 50)
    assert r.schedule.name == "constant" and r.augmentation.name == "dsa" and r.loss.name == "ce"


def test_train_expert_records_init_and_every_epoch(expert):
    net = create_network("convnet", 4, image_size=16, **KW)
    assert expert.params.shape == (3 + 1, num_params(net)) and expert.params.dtype == torch.float32
    assert expert.network_kwargs == {"in_channels": 3, "image_size": 16, **KW}
    # snapshot 0 is the seeded initialisation, and every epoch moves the weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        init = flat_params(create_network("convnet", 4, in_channels=3, image_size=16, **KW))
    assert torch.equal(expert.params[0], init)
    steps = (expert.params[1:] - expert.params[:-1]).norm(dim=1)
    assert (steps > 0).all()
    assert torch.equal(flat_params(expert.network_at(3)), expert.params[3])
    assert expert.meta["model_space"]["mean"] == [0.4914, 0.4822, 0.4465] and expert.meta["seed"] == 5


def test_round_trip_and_buffer(tmp_path, expert):
    for i in range(2):
        save_expert(expert_path(tmp_path, i), expert)
    assert sorted(os.listdir(tmp_path)) == ["expert_0000.pt", "expert_0001.pt"]
    loaded = load_expert(tmp_path / "expert_0001.pt")
    assert torch.equal(loaded.params, expert.params)
    assert (loaded.network, loaded.network_kwargs, loaded.num_classes, loaded.epochs, loaded.lr) == \
        (expert.network, expert.network_kwargs, expert.num_classes, expert.epochs, expert.lr)
    assert loaded.meta["model_space"] == expert.meta["model_space"]
    buf = ExpertBuffer(tmp_path)
    assert len(buf) == 2 and all(torch.equal(t, expert.params) for t in buf.trajectories())


P = num_params(create_network("convnet", 4, image_size=16, **KW))


def _write_raw(path, **changes):
    payload = {"format": EXPERT_FORMAT, "network": "convnet", "network_kwargs": {"image_size": 16, **NET},
               "num_classes": 4, "epochs": 2, "lr": 0.01, "params": torch.zeros(3, P), "meta": {}}
    payload.update(changes)
    torch.save({k: v for k, v in payload.items() if v is not None}, path)
    return path


@pytest.mark.parametrize("changes,problem", [
    ({"params": torch.zeros(2, P)}, "incomplete trajectory"),
    ({"params": torch.zeros(3, 10)}, f"10 values per snapshot, network 'convnet' has {P}"),
    ({"params": torch.zeros(3, P).index_fill_(1, torch.tensor([7]), float("nan"))}, r"NaN/inf at snapshots \[0, 1, 2\]"),
    ({"params": torch.zeros(3, P, dtype=torch.float16)}, "must be float32"),
    ({"format": "mtt.replay_buffer"}, "format is 'mtt.replay_buffer'"),
    ({"meta": None}, r"missing keys \['meta'\]"),
    ({"epochs": "2"}, "wrong types for epochs"),
    ({"network": "convnet9000"}, "cannot build network 'convnet9000'"),
])
def test_invalid_expert_files_name_file_and_problem(tmp_path, changes, problem):
    path = _write_raw(tmp_path / "expert_0003.pt", **changes)
    with pytest.raises(ExpertFormatError, match=problem) as err:
        load_expert(path)
    assert str(err.value).startswith(f"{path}: ")
    _write_raw(path)  # the untouched payload is valid
    assert load_expert(path).epochs == 2


def test_truncated_or_missing_files_name_the_file(tmp_path, expert):
    path = save_expert(tmp_path / "expert_0000.pt", expert)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ExpertFormatError, match=f"{path}: unreadable"):
        ExpertBuffer(tmp_path)[0]
    with pytest.raises(ExpertFormatError, match="expert_0009.pt: no such expert file"):
        load_expert(tmp_path / "expert_0009.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExpertFormatError, match="empty: no expert_"):
        ExpertBuffer(tmp_path / "empty")


def test_inconsistent_buffer_is_rejected(tmp_path, expert):
    save_expert(expert_path(tmp_path, 0), expert)
    _write_raw(expert_path(tmp_path, 1), network_kwargs={"image_size": 16, "in_channels": 3, "width": 8,
                                                         "depth": 2, "norm": "batchnorm"}, params=torch.zeros(3, P))
    buf = ExpertBuffer(tmp_path)
    assert buf[0].epochs == 3
    with pytest.raises(ExpertFormatError, match="expert_0001.pt: expert .* does not match expert_0000.pt"):
        buf[1]


def test_build_buffer_resumes_at_first_missing_or_broken_expert(tmp_path):
    kw = dict(num_classes=4, recipe=recipe(epochs=1))
    buf = build_expert_buffer(tmp_path, *data(32), num_experts=2, seed=0, **kw)
    assert len(buf) == 2 and not torch.equal(buf[0].params[0], buf[1].params[0])  # seeds 0 and 1
    first_mtime = expert_path(tmp_path, 0).stat().st_mtime_ns
    expert_path(tmp_path, 1).write_bytes(b"garbage")
    buf = build_expert_buffer(tmp_path, *data(32), num_experts=3, seed=0, **kw)
    assert len(buf) == 3 and expert_path(tmp_path, 0).stat().st_mtime_ns == first_mtime
    assert all(e.params.shape[0] == 2 for e in buf)
