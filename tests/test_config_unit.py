"""The settings table (common/config.py): one loader, each default once, typed errors."""
from __future__ import annotations

import subprocess
import sys

import pytest

from common import config
from common.config import REPO_ROOT, ConfigError, Settings, load_settings, stack_dir


def test_every_setting_reads_its_variable_and_survives_to_env():
    env = {"WEBOS_BRIDGE_LINGER_MS": "7.5", "WEBOS_BRIDGE_QUEUES": "webos.a, webos.b",
           "WEBOS_BRIDGE_PREFETCH": "12", "PUBLISHER_API_TOKEN": "t0ken", "WEBOS_LOG_LEVEL": "DEBUG"}
    settings = load_settings(env, dotenv_path=None)
    assert (settings.bridge_linger_ms, settings.bridge_queues, settings.bridge_prefetch,
            settings.publisher_api_token, settings.log_level) == \
        (7.5, ("webos.a", "webos.b"), 12, "t0ken", "DEBUG")
    # What a launcher hands its children reads back as the same settings.
    assert load_settings(settings.to_env(), dotenv_path=None) == settings
    assert settings.to_env()["PUBLISHER_API_TOKEN"] == "t0ken"


def test_dotenv_counts_and_the_environment_wins(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("PUBLISHER_API_TOKEN=from-file\nWEBOS_BRIDGE_PREFETCH=9\n")
    settings = load_settings({"WEBOS_BRIDGE_PREFETCH": "10"}, dotenv_path=dotenv)
    assert (settings.publisher_api_token, settings.bridge_prefetch) == ("from-file", 10)


@pytest.mark.parametrize("variable, value", [("WEBOS_AMQP_PORT", "five"),
                                             ("WEBOS_BRIDGE_LINGER_MS", "soon")])
def test_a_malformed_value_is_a_config_error_naming_the_variable(variable, value):
    with pytest.raises(ConfigError, match=f"{variable}='{value}'"):
        load_settings({variable: value}, dotenv_path=None)


def test_a_stack_dir_at_the_repository_is_refused():
    with pytest.raises(ConfigError, match="WEBOS_STACK_DIR"):
        stack_dir(Settings(stack_dir="."))


def test_the_devices_file_is_resolved_against_the_repository():
    assert Settings().devices_path == REPO_ROOT / "publisher" / "devices.json"
    assert Settings().devices_path.exists()


def test_a_command_exits_2_with_the_message_on_a_config_error():
    env = {"PATH": "/usr/bin:/bin", "WEBOS_AMQP_PORT": "five"}
    done = subprocess.run([sys.executable, "-m", "rabbitmq.topology"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "configuration error: WEBOS_AMQP_PORT='five' is not a valid int" in done.stderr
    assert "Traceback" not in done.stderr


def test_each_cluster_node_has_its_own_ports_and_node_name():
    settings = Settings(rabbitmq_nodes=3, amqp_port=5671, mqtt_port=8883, management_port=15671)
    nodes = settings.rabbitmq_addresses()
    assert [(n.amqp_port, n.mqtt_port, n.management_port) for n in nodes] == [
        (5671, 8883, 15671), (5681, 8893, 15681), (5691, 8903, 15691)]
    assert [n.rabbitmq_node for n in nodes] == ["webos", "webos-2", "webos-3"]
    assert settings.cluster and not nodes[1].cluster
    assert Settings().rabbitmq_addresses() == [Settings()]
    with pytest.raises(ConfigError, match="WEBOS_RABBITMQ_NODES"):
        Settings(rabbitmq_nodes=0)
    # node 3's plain management port (15672 + 20) would be node 1's rabbitmq_prometheus port
    with pytest.raises(ConfigError, match="node 3's WEBOS_MANAGEMENT_PLAIN_PORT and node 1's "
                                          "WEBOS_RABBITMQ_METRICS_PORT would both be port 15692"):
        Settings(rabbitmq_nodes=3, plain_listeners=True).check_local_ports()
    Settings(rabbitmq_nodes=3, plain_listeners=True, rabbitmq_metrics_port=15800).check_local_ports()
    Settings().check_local_ports()


def test_a_running_cluster_stack_is_what_later_commands_assume_until_it_stops(tmp_path):
    """`WEBOS_RABBITMQ_NODES=3 make run` records the cluster; a bridge or CLI started in another
    shell (no variable set) then knows its three nodes; the environment still wins; `run` and
    `up` ignore the record; once the stack stops, one node again."""
    env = {"WEBOS_STACK_DIR": str(tmp_path / "stack")}
    assert config.load_settings(env, dotenv_path=None).rabbitmq_nodes == 1
    config.record_stack_state(Settings(stack_dir=str(tmp_path / "stack"), rabbitmq_nodes=3))
    assert config.load_settings(env, dotenv_path=None).rabbitmq_nodes == 3
    assert config.load_settings({**env, "WEBOS_RABBITMQ_NODES": "1"},
                                dotenv_path=None).rabbitmq_nodes == 1
    assert config.load_settings(env, dotenv_path=None, running_stack=False).rabbitmq_nodes == 1
    config.clear_stack_state(Settings(stack_dir=str(tmp_path / "stack")))
    assert config.load_settings(env, dotenv_path=None).rabbitmq_nodes == 1


def test_cluster_nodes_named_by_host_share_the_ports():
    """docker-compose.cluster.yml's apps: WEBOS_RABBITMQ_HOSTS names the nodes, each on the same
    ports; the node count and the first host follow from the list."""
    settings = config.load_settings({"WEBOS_RABBITMQ_HOSTS": "rabbitmq,rabbitmq-2,rabbitmq-3"},
                                    dotenv_path=None, running_stack=False)
    assert settings.cluster and settings.rabbitmq_nodes == 3 and settings.rabbitmq_host == "rabbitmq"
    nodes = settings.rabbitmq_addresses()
    assert [(n.rabbitmq_host, n.amqp_port, n.mqtt_port) for n in nodes] == [
        ("rabbitmq", 5671, 8883), ("rabbitmq-2", 5671, 8883), ("rabbitmq-3", 5671, 8883)]
    assert [n.management_url for n in nodes][2] == "https://rabbitmq-3:15671"
    assert not nodes[1].cluster
    with pytest.raises(ConfigError, match="set one of the two"):
        Settings(rabbitmq_hosts=("a", "b", "c"), rabbitmq_nodes=2)


def test_a_single_node_denies_transient_queues_on_its_first_boot_only(tmp_path):
    """RabbitMQ 4.0.5's boot check of a denied transient_nonexcl_queues fails on a node that
    boots with data (make run's restart test, CI 2026-12-04): a restart leaves it at the default."""
    from stack.rabbitmq_runtime import Runtime
    from stack.rabbitmq_server import LocalRabbitMQ

    node = LocalRabbitMQ(tmp_path, Settings())
    node._runtime = Runtime(root=None, version="4.0.5")  # the host's paths: nothing is built
    key = "deprecated_features.permit.transient_nonexcl_queues"
    assert f"{key} = false" in node.render_config()
    (tmp_path / "mnesia" / "webos@localhost").mkdir(parents=True)  # what a first boot leaves
    assert key not in node.render_config()
