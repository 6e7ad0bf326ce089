"""Routing analysis: per-class routing table, each choice's accuracy, the oracle bound and
the files and picture written from them (CPU, offline, no training)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import dsnet
from dsnet.data.datasets import TensorImageDataset
from dsnet.eval.evaluate import (
    evaluate_dynamic,
    evaluate_routing,
    evaluate_subnets,
    format_table,
    headroom,
    oracle_point,
    routing_rows,
    write_results,
)
from dsnet.models.checkpoint import atomic_torch_save


@pytest.fixture(scope="module")
def setup() -> tuple[torch.nn.Module, DataLoader, TensorImageDataset]:
    torch.manual_seed(0)
    model = dsnet.create_model("ds_mbnet_small", routing_space=(0, 5, 9, 13)).eval()
    with torch.no_grad():  # a head that really splits the batch over the four choices
        model.gate_head.gate[0].weight.mul_(40.0)
    images = torch.randn(96, 1, 28, 28)
    labels = torch.arange(96) % 10
    data = TensorImageDataset(images, labels)
    return model, DataLoader(data, batch_size=20), data


def test_routing_table_is_consistent_with_the_gate_and_every_tail(setup):
    model, loader, data = setup
    routing = evaluate_routing(model, loader, 10, input_size=28, keep=5)
    dynamic = evaluate_dynamic(model, loader, input_size=28)
    k = len(model.routing_space)
    assert routing["images"] == [10] * 6 + [9] * 4
    sent = torch.tensor(routing["sent"])
    assert sent.sum(1).tolist() == routing["images"]
    assert sent.sum(0).tolist() == list(dynamic["choices"].values())
    assert len([c for c in dynamic["choices"].values() if c > 0]) >= 2, "test needs a split"
    # The gate's right answers are the dynamic accuracy's; each choice's are its subnet's.
    assert 100 * sum(routing["gate_correct"]) / 96 == pytest.approx(dynamic["top1"])
    rows = evaluate_subnets(model, loader, list(model.routing_space), input_size=28)
    per_choice = torch.tensor(routing["correct"]).sum(0)
    assert [100 * c / 96 for c in per_choice.tolist()] == pytest.approx(
        [r["top1"] for r in rows])
    # The oracle is right whenever any choice is, and pays the cheapest right choice.
    correct = torch.tensor(routing["correct"])
    assert all(o >= max(row) for o, row in zip(routing["oracle_correct"], correct.tolist()))
    oracle = oracle_point(routing)
    assert oracle["top1"] >= dynamic["top1"]
    assert routing["choice_madds"][0] <= oracle["madds"] <= routing["choice_madds"][-1]
    assert len(routing["choice_madds"]) == k


def test_examples_are_images_the_gate_sent_to_each_choice(setup):
    model, loader, data = setup
    routing = evaluate_routing(model, loader, 10, input_size=28, keep=5)
    dynamic = evaluate_dynamic(model, loader, input_size=28)
    assert set(routing["examples"]) == {str(c) for c in model.routing_space}
    for subnet in model.routing_space:
        picked = routing["examples"][str(subnet)]
        assert len(picked) == min(5, dynamic["choices"][subnet])
        if picked:
            x = torch.stack([data[i][0] for i in picked])
            _, choices = model(x, subnet="dynamic", return_choices=True)
            assert choices.tolist() == [subnet] * len(picked)


def test_headroom_share_is_gate_gain_over_oracle_gain():
    subnets = [{"subnet": 0, "madds": 1e6, "top1": 80.0}, {"subnet": 1, "madds": 3e6,
                                                            "top1": 90.0}]
    out = headroom(subnets, {"top1": 87.0, "madds": 2e6}, {"top1": 95.0, "madds": 1.5e6})
    assert out["static_top1_at_madds"] == pytest.approx(85.0)
    assert out["gain"] == pytest.approx(2.0) and out["oracle_gain"] == pytest.approx(12.5)
    assert out["headroom_captured"] == pytest.approx(2.0 / 12.5)


def test_routing_outputs_are_written(tmp_path: Path, setup):
    model, loader, data = setup
    routing = evaluate_routing(model, loader, 10, input_size=28)
    routing["classes"] = [f"class{c}" for c in range(10)]
    subnets = evaluate_subnets(model, loader, list(range(model.num_subnets)), input_size=28)
    dynamic = {**evaluate_dynamic(model, loader, input_size=28), "routing": routing,
               "oracle": oracle_point(routing)}
    ckpt = tmp_path / "gate.pt"
    atomic_torch_save({"epoch": 0, "state_dict": model.state_dict()}, ckpt)
    out = tmp_path / "results"
    write_results(out, {"subnets": subnets, "dynamic": dynamic}, ckpt,
                  lambda idx: torch.stack([data[i][0] for i in idx]))
    assert {p.name for p in out.iterdir()} == {
        "accuracy_madds.png", "dsnet_final.pt", "dynamic.csv", "subnets.csv", "routing.csv",
        "routing.png"}
    assert (out / "routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = list(csv.DictReader((out / "routing.csv").open()))
    assert [r["class"] for r in table] == [str(c) for c in range(10)] + ["all"]
    assert table[3]["name"] == "class3"
    shares = [float(table[-1][f"share_{c}"]) for c in model.routing_space]
    assert sum(shares) == pytest.approx(100.0)
    assert float(table[-1]["gate_top1"]) == pytest.approx(dynamic["top1"])
    row = next(csv.DictReader((out / "dynamic.csv").open()))
    assert float(row["oracle_top1"]) == pytest.approx(dynamic["oracle"]["top1"])
    assert {"gain", "oracle_gain", "headroom_captured", "static_top1_at_madds"} <= set(row)
    assert "oracle" in format_table(subnets, dynamic)
    assert routing_rows(routing)[-1]["images"] == 96
