"""Group DRO over (class, source) cells or sources (``train.objective=group_dro``, ``train.dro_groups``): the
weights follow the worst group, the loss is their weighted mean, a training uses it and a resumed one
continues with the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import kill_in_validation, tiny_config
from xraydx.config import Config, validate
from xraydx.errors import ConfigError
from xraydx.groupdro import GroupDRO, group_ids


def test_group_ids_are_class_source_cells() -> None:
    ids, names = group_ids([0, 0, 1, 0, 2], ["a", "b", "a", "a", ""], ["covid", "non_covid", "normal"])
    assert names == ["covid:a", "covid:b", "non_covid:a", "normal:"]
    assert ids.tolist() == [0, 1, 2, 0, 3]


def test_group_ids_by_source_join_a_sources_classes() -> None:
    ids, names = group_ids(
        [0, 0, 1, 0, 2], ["a", "b", "a", "a", ""], ["covid", "non_covid", "normal"], "source"
    )
    assert names == ["a", "b", ""]
    assert ids.tolist() == [0, 1, 0, 0, 2]
    with pytest.raises(ValueError, match="class_source or source"):
        group_ids([0], ["a"], ["covid"], "class")


def test_weights_move_to_the_worst_group_and_loss_is_their_weighted_mean() -> None:
    dro = GroupDRO(3, eta=0.5, device=torch.device("cpu"))
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    per = torch.tensor([0.1, 0.1, 0.2, 0.2, 2.0, 2.0], requires_grad=True)
    loss = dro.loss(per, groups)
    q = torch.tensor(dro.state())
    # one exponentiated-gradient step from uniform: q ∝ exp(eta * group mean loss)
    expect = torch.exp(0.5 * torch.tensor([0.1, 0.2, 2.0], dtype=torch.float64))
    assert torch.allclose(q.double(), expect / expect.sum(), atol=1e-9)
    assert float(loss.detach()) == pytest.approx(float((q * torch.tensor([0.1, 0.2, 2.0])).sum()), rel=1e-6)
    loss.backward()
    g = per.grad
    assert g is not None and g[4] > g[2] > g[0] > 0  # the hard group gets the largest gradient
    for _ in range(50):
        dro.loss(per.detach(), groups)
    assert dro.state()[2] > 0.99  # repeated: the weight concentrates on the worst group


def test_groups_absent_from_a_batch_keep_their_weight_and_do_not_enter_its_loss() -> None:
    dro = GroupDRO(3, eta=1.0, device=torch.device("cpu"))
    loss = dro.loss(torch.tensor([1.0, 3.0]), torch.tensor([0, 1]))
    q = dro.state()
    assert q[2] < q[0] < q[1]  # group 2 did not move up; the others did, by their losses
    assert float(loss) == pytest.approx((q[0] * 1.0 + q[1] * 3.0) / (q[0] + q[1]), rel=1e-6)


def test_bad_settings_are_refused() -> None:
    cfg = Config()
    cfg.train.objective = "worst"
    with pytest.raises(ConfigError, match="train.objective"):
        validate(cfg)
    cfg.train.objective = "group_dro"
    for eta in (0.0, -1.0, float("nan"), float("inf")):
        cfg.train.dro_eta = eta
        with pytest.raises(ConfigError, match="dro_eta"):
            validate(cfg)
    cfg.train.dro_eta = 0.1
    cfg.train.dro_groups = "class"
    with pytest.raises(ConfigError, match="train.dro_groups"):
        validate(cfg)
    with pytest.raises(ValueError, match="groups"):
        GroupDRO(2, 0.1, torch.device("cpu")).load_state([0.5, 0.25, 0.25])


def _q(run: Path) -> list[float]:
    with safe_open(str(run / "checkpoints" / "last.state.safetensors"), framework="pt") as fh:
        return json.loads(fh.metadata()["state"])["info"]["dro_q"]


def test_training_with_group_dro_saves_its_weights_and_resume_continues_from_them(
    tmp_path: Path, sample_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xraydx.train import run_training

    def cfg(runs: Path) -> object:
        return tiny_config(
            sample_dir, runs, epochs=2, objective="group_dro", dro_eta=0.5, balance="class_source"
        )

    full = run_training(cfg(tmp_path / "a"), progress=False)  # type: ignore[arg-type]
    log = (full / "train.log").read_text()
    assert "Group DRO over" in log and "(class, source) cells" in log and "heaviest groups" in log
    q_full = _q(full)
    n_cells = len({(r["label"], r["source"]) for r in _manifest_rows(full) if r["split"] == "train"})
    assert len(q_full) == n_cells and sum(q_full) == pytest.approx(1.0)
    assert max(q_full) > 1.0 / n_cells + 1e-3  # the weights moved away from uniform

    run = kill_in_validation(monkeypatch, cfg(tmp_path / "b"), epoch=2)
    assert run_training(None, resume=run, progress=False) == run
    assert _q(run) == pytest.approx(q_full, abs=1e-12)  # same weights as the uninterrupted run


def test_group_dro_over_sources_has_one_weight_per_train_source(tmp_path: Path, sample_dir: Path) -> None:
    from xraydx.train import run_training

    cfg = tiny_config(
        sample_dir, tmp_path, epochs=1, objective="group_dro", dro_eta=0.5, dro_groups="source",
        balance="class_source",
    )  # fmt: skip
    run = run_training(cfg, progress=False)  # type: ignore[arg-type]
    sources = sorted({r["source"] for r in _manifest_rows(run) if r["split"] == "train"})
    assert len(sources) >= 2
    assert f"Group DRO over {len(sources)} sources" in (run / "train.log").read_text()
    q = _q(run)
    assert len(q) == len(sources) and sum(q) == pytest.approx(1.0)
    assert max(q) > 1.0 / len(sources) + 1e-3


def _manifest_rows(run: Path) -> list[dict[str, str]]:
    import csv

    with (run / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))
