"""docs/recipes.md's Kubernetes and Slurm examples retry exactly the statuses the recipe uses for
"rerun me" and never the one it uses for "this will fail again". No cluster runs here: the YAML is
parsed and its commands checked against the recipe's own argument parser and exit statuses."""

import re
from pathlib import Path

import pytest
import yaml

from recipes.inception_bn import ending, train

DOC = (Path(__file__).resolve().parents[2] / "docs" / "recipes.md").read_text()
# What the recipe returns: 130 (stopped, saved) and 138 (a lost peer, a stall) ask for a rerun;
# 137 and 143 are SIGKILL and SIGTERM before it took the signals; 2 is a usage or data error.
RETRYABLE = {ending.INTERRUPTED, ending.RETRYABLE, 128 + 9, 128 + 15}


def _blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", DOC, re.DOTALL)


def _manifests():
    return {document["kind"]: document for block in _blocks("yaml") for document in yaml.safe_load_all(block)}


def _usage_error_status(capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(["--variant", "bn-x5", "--run-dir", "unused", "--batch-size", "0"])
    capsys.readouterr()
    return exit_.value.code


def _train_command(container):
    command = container["command"]
    assert command[:3] == ["python", "-m", "recipes.inception_bn.train"], command
    train.parse_args(command[3:])  # the flags exist and parse


def test_the_recipe_uses_the_statuses_the_docs_name(capsys):
    assert ending.INTERRUPTED == 130 and ending.RETRYABLE == 138
    assert _usage_error_status(capsys) == 2
    rows = dict(re.findall(r"^\| \*\*(\d+)\*\* \| (.*?) \|", DOC, re.MULTILINE))
    assert rows["130"].startswith("stopped by SIGTERM/SIGINT") and rows["2"].startswith("a usage or data error")
    assert rows["138"].startswith("a peer lost, a stall, or a cluster that did not form")
    assert {int(status) for status in rows} == {ending.REFUSED, ending.INTERRUPTED, ending.RETRYABLE}


def test_the_kubernetes_job_retries_130_and_138_and_fails_on_2(capsys):
    job = _manifests()["Job"]
    rules = job["spec"]["podFailurePolicy"]["rules"]
    (fail,) = [rule for rule in rules if rule["action"] == "FailJob"]
    assert fail["onExitCodes"]["operator"] == "NotIn" and set(fail["onExitCodes"]["values"]) == RETRYABLE
    usage = _usage_error_status(capsys)
    assert usage not in RETRYABLE  # FailJob on 2: a usage error is never retried
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"  # what a pod failure policy requires
    (container,) = spec["containers"]
    assert container["name"] == fail["onExitCodes"]["containerName"]
    _train_command(container)


def test_the_tfjob_exit_code_policy_retries_what_the_recipe_asks_to(capsys):
    tfjob = _manifests()["TFJob"]
    worker = tfjob["spec"]["tfReplicaSpecs"]["Worker"]
    assert worker["restartPolicy"] == "ExitCode"

    def kubeflow_retries(status):  # Kubeflow's ExitCode policy: 1-127 permanent, 128-255 retryable
        return 128 <= status <= 255

    assert all(kubeflow_retries(status) for status in RETRYABLE)
    assert not kubeflow_retries(_usage_error_status(capsys))
    (container,) = worker["template"]["spec"]["containers"]
    _train_command(container)


def test_the_slurm_script_kills_the_rest_and_requeues_the_retryable_statuses():
    (script,) = [block for block in _blocks("bash") if "srun" in block]
    assert "srun --kill-on-bad-exit=1" in script and "--requeue" in script
    (codes,) = re.findall(r"case \$status in ([\d|]+)\) scontrol requeue", script)
    assert {int(code) for code in codes.split("|")} == RETRYABLE
