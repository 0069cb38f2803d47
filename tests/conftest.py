import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples in every run, whatever ran before them in the worker,
# and no example database carries failures from one run (or torch version) into the next.
settings.register_profile("torchquant", derandomize=True, database=None)
settings.load_profile("torchquant")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    """Runs a test on the CPU, and on CUDA where a GPU exists."""
    return torch.device(request.param)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    float reductions that do not depend on the machine, and the fastest setting for tiny models."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A saved random-init 2-layer Llama (hidden 128: groups of 32 and 64 divide it) and a
    byte-level BPE tokenizer trained on the calibration text: a ``--model`` folder for ``torchquant lm``."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from torchquant.bench.lm import default_texts

    folder = tmp_path_factory.mktemp("tiny-llama")
    calib, _ = default_texts()
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([calib[:20000]], tokenizers.trainers.BpeTrainer(vocab_size=320, show_progress=False))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder
