"""The simulation on a real Ray cluster of two nodes on loopback (`simulation.ray-address`):
client work runs on both, as the nodes themselves report."""

from __future__ import annotations

import socket

import pytest

from conftest import TINY


def test_a_two_node_ray_cluster_runs_the_tiny_experiment(tmp_path, cache_dir):
    from ray.cluster_utils import Cluster

    from fedllm.simulate import load_experiment, simulate

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        config = load_experiment(TINY, {"simulation.ray-address": cluster.address, "num-server-rounds": 1})
        summary = simulate(config, tmp_path / "run", client_app="node_client:app")
        assert summary["rounds"] == 1 and summary["privacy"]["clients_reporting"] > 0
        reported = set((tmp_path / "run" / "nodes.txt").read_text().split())
        assert reported == {cluster.head_node.node_id, worker.node_id}, reported
    finally:
        cluster.shutdown()


def test_an_unreachable_cluster_is_refused_before_anything_starts(tmp_path, cache_dir):
    from fedllm.errors import FedllmError
    from fedllm.simulate import load_experiment, simulate

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once the probe closes
    config = load_experiment(TINY, {"simulation.ray-address": f"127.0.0.1:{port}"})
    with pytest.raises(FedllmError, match="simulation.ray-address.*ray start --head"):
        simulate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
