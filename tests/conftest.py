from __future__ import annotations

import pytest
from typer.testing import CliRunner

from helpers import CNN_YAML, MLP_YAML, make_teacher
from n2n_cli.cli import app
from n2n_cli.spec import load_model_description


@pytest.fixture
def runner():
    return CliRunner(env={"COLUMNS": "200"})


@pytest.fixture
def cli(runner):
    def invoke(*args, input=None):
        return runner.invoke(app, [str(a) for a in args], input=input)
    return invoke


@pytest.fixture
def cnn_desc():
    return load_model_description(CNN_YAML)


@pytest.fixture
def cnn_teacher(tmp_path, cnn_desc):
    path = tmp_path / "teacher.safetensors"
    make_teacher(cnn_desc, path)
    return path


@pytest.fixture
def mlp_teacher(tmp_path):
    path = tmp_path / "mlp.safetensors"
    make_teacher(load_model_description(MLP_YAML), path, seed=3)
    return path
