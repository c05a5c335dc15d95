import pytest
import torch

from posttrain.engines.models import build_preset
from posttrain.engines.tokenizer import build_char_tokenizer


@pytest.fixture(scope="session")
def char_tok():
    return build_char_tokenizer()


@pytest.fixture()
def tiny_model(char_tok):
    torch.manual_seed(0)
    model = build_preset(
        "tiny", len(char_tok), pad_token_id=char_tok.pad_token_id, eos_token_id=char_tok.eos_token_id
    )
    return model.eval()
