import pytest
import torch

from precisionrt.models.gpt import ModelConfig, build_gpt
from precisionrt.distributed.parallel import init_parallel

SMALL = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, seq_length=32,
                    vocab_size=256)


@pytest.fixture(scope="session")
def parallel():
    init_parallel(1)


@pytest.fixture
def small_model(parallel):
    torch.manual_seed(0)
    return build_gpt(SMALL)


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (4, SMALL.seq_length + 1), generator=g)
