"""Checkpoints: whole models with lstm_ext modules load with torch.load's default weights_only=True
wherever the same model with nn.LSTM does, and state_dicts load both ways between lstm_ext and native.

The whole-model tests save and load in fresh processes, as a training script and a later
inference script would (PyTorch's word_language_model example saves the whole model and
reloads it allow-listing the classes it knows: nn.LSTM among them, not lstm_ext's).
"""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import lstm_ext
from conftest import compare, make_input

MODEL_MODULE = textwrap.dedent(
    """
    import functools

    import torch
    from torch import nn

    import lstm_ext

    VARIANT = dict(layer_norm=True, peephole=True)
    FLAVOURS = {
        "native": (nn.LSTM, nn.LSTMCell),
        "lstm_ext": (lstm_ext.LSTM, lstm_ext.LSTMCell),
        "lstm_ext_variant": (functools.partial(lstm_ext.LSTM, **VARIANT), functools.partial(lstm_ext.LSTMCell, **VARIANT)),
    }


    class RNNModel(nn.Module):
        def __init__(self, flavour):
            super().__init__()
            lstm, cell = FLAVOURS[flavour]
            self.encoder = nn.Embedding(10, 3)
            self.rnn = lstm(3, 4, num_layers=2, bidirectional=True, proj_size=2)
            self.cell = cell(4, 5)
            self.decoder = nn.Linear(5, 10)

        def forward(self, tokens):
            output, _ = self.rnn(self.encoder(tokens))
            hidden, _ = self.cell(output[-1])
            return self.decoder(hidden)
    """
)

SAVE = textwrap.dedent(
    """
    import sys
    import torch
    from model import RNNModel

    directory, flavour = sys.argv[1:]
    torch.manual_seed(0)
    model = RNNModel(flavour)
    tokens = torch.randint(10, (6, 2))
    torch.save(model, f"{directory}/model.pt")
    torch.save({"tokens": tokens, "logits": model(tokens).detach()}, f"{directory}/expected.pt")
    """
)

# What the inference script of a native model runs: its own allow-list, torch.load's defaults.
LOAD = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    import model

    directory, allow_model_class = sys.argv[1], sys.argv[2] == "1"
    allowed = [nn.Embedding, nn.LSTM, nn.LSTMCell, nn.Linear] + ([model.RNNModel] if allow_model_class else [])
    torch.serialization.add_safe_globals(allowed)
    try:
        loaded = torch.load(f"{directory}/model.pt")
    except Exception as error:
        print(type(error).__name__, error)
        sys.exit(3)
    expected = torch.load(f"{directory}/expected.pt")
    assert type(loaded.rnn).__name__ == "LSTM" and type(loaded.cell).__name__ == "LSTMCell"
    torch.testing.assert_close(loaded(expected["tokens"]), expected["logits"], rtol=0, atol=0)
    """
)


def run_script(script, directory, *args):
    return subprocess.run(
        [sys.executable, "-c", script, str(directory), *args],
        cwd=directory,
        env={"PYTHONPATH": f"{directory}:{':'.join(sys.path)}"},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "model.py").write_text(MODEL_MODULE)
    return tmp_path


def save_model(model_dir, flavour):
    completed = run_script(SAVE, model_dir, flavour)
    assert completed.returncode == 0, completed.stderr


@pytest.mark.parametrize("flavour", ["native", "lstm_ext", "lstm_ext_variant"])
def test_whole_model_loads_with_default_weights_only_in_a_fresh_process(model_dir, flavour):
    save_model(model_dir, flavour)
    completed = run_script(LOAD, model_dir, "1")
    assert completed.returncode == 0, completed.stdout + completed.stderr


@pytest.mark.parametrize("flavour", ["native", "lstm_ext"])
def test_weights_only_load_still_refuses_classes_the_script_did_not_allow(model_dir, flavour):
    """Registering lstm_ext's classes allows them, nothing else: the model class stays refused."""
    save_model(model_dir, flavour)
    completed = run_script(LOAD, model_dir, "0")
    assert completed.returncode == 3, completed.stdout + completed.stderr
    assert completed.stdout.startswith("UnpicklingError") and "model.RNNModel" in completed.stdout


@pytest.mark.parametrize("direction", ["native_to_lstm_ext", "lstm_ext_to_native"])
@pytest.mark.parametrize("module", ["LSTM", "LSTMCell"])
def test_state_dict_loads_both_ways_between_native_and_lstm_ext(tmp_path, direction, module):
    kwargs = dict(num_layers=2, bidirectional=True, proj_size=2) if module == "LSTM" else {}
    torch.manual_seed(0)
    native, ext = getattr(nn, module)(3, 4, **kwargs), getattr(lstm_ext, module)(3, 4, **kwargs)
    source, target = (native, ext) if direction == "native_to_lstm_ext" else (ext, native)
    torch.save(source.state_dict(), tmp_path / "state.pt")
    target.load_state_dict(torch.load(tmp_path / "state.pt"))
    x = make_input(torch.float32, input_size=3)
    if module == "LSTMCell":
        x = x[0]
    compare(ext(x), native(x))
