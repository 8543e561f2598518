"""What a batch's forward pass gets: no attention mask where no context is padded (no all-ones check, so no device
sync), the same outputs either way, the padding still masked where there is some; and no KV cache."""

import numpy as np
import pytest
import torch

from mining.batch import model_mask
from mining.tiny import tiny_model


def test_no_mask_without_padding():
    assert model_mask(np.array([8, 8, 8]), 8) is None
    mask = model_mask(np.array([8, 5]), 8)
    assert mask.dtype == np.int64 and mask.shape == (2, 8)
    assert mask[0].all() and mask[1].tolist() == [1] * 5 + [0] * 3


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_no_mask_means_what_all_ones_meant(arch):
    """Bit for bit: transformers drops an all-ones mask itself, after reading it (a sync on a GPU)."""
    model = tiny_model(arch)
    ids = torch.randint(0, 500, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ones = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        none = model(input_ids=ids, attention_mask=model_mask(np.full(3, 12), 12)).logits
    assert torch.equal(ones, none)


def test_an_encoder_still_sees_its_padding():
    """With a padded context the mask is kept: a bidirectional model would otherwise attend to the padding."""
    model = tiny_model("bert")
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(1))
    lengths = np.array([12, 7])
    mask = model_mask(lengths, 12)
    with torch.inference_mode():
        padded = model(input_ids=ids, attention_mask=torch.from_numpy(mask)).logits
        alone = model(input_ids=ids[1:, :7]).logits
    torch.testing.assert_close(padded[1, :7], alone[0], rtol=1e-5, atol=1e-5)


def test_make_batch_passes_a_mask_only_with_padding():
    from mining.batch import make_batch
    from mining.shards import Shard

    C, L = 3, 8
    length = np.array([8, 8, 5])
    shard = Shard(index=0, ids=np.arange(C * L).reshape(C, L), length=length, first=np.zeros(C, np.int64),
                  mined=length.copy(), tok0=np.array([0, 8, 16]), ctx=np.arange(C), doc_id=np.arange(C),
                  spans=np.full((C, L, 2), -1, np.int32), next_id=np.full(C, -1), token_text=np.array([], object))
    grid, cpu = shard.tok_grid(), torch.device("cpu")
    assert make_batch(shard, slice(0, 2), grid, cpu).attention is None
    assert make_batch(shard, slice(2, 3), grid, cpu).attention is None  # one context of 5: T is 5, nothing padded
    both = make_batch(shard, slice(1, 3), grid, cpu).attention
    assert both.tolist() == [[1] * 8, [1] * 5 + [0] * 3]


def test_a_loaded_model_keeps_no_kv_cache(tmp_path, smol_tokenizer):
    from mining.models import load_model
    from mining.spec import ModelSpec

    tiny_model("llama", vocab_size=len(smol_tokenizer)).save_pretrained(tmp_path)
    smol_tokenizer.save_pretrained(tmp_path)
    loaded = load_model(ModelSpec(id=str(tmp_path)))
    with torch.inference_mode():
        out = loaded.model(input_ids=torch.zeros(1, 4, dtype=torch.int64))
    assert out.past_key_values is None


def test_token_scores_a_few_rows_at_a_time_are_the_whole_contexts_bits():
    """The token table's log-prob and entropy, taken a few rows at a time on the CPU (rows of 20 at this vocabulary,
    a context of 45 in three pieces; the logits one position longer than the targets), equal log_softmax over whole
    contexts bit for bit, NaN where there is no next token."""
    from mining.batch import token_scores

    g = torch.Generator().manual_seed(1)
    C, T, V = 3, 45, 50_000
    logits = torch.randn(C, T + 1, V, generator=g) * 4
    target = torch.randint(0, V, (C, T), generator=g).numpy()
    target[1, 30:] = -1
    logprob, entropy = token_scores(logits, target)
    lsm = torch.log_softmax(logits[:, :T], dim=-1)
    want = lsm.gather(-1, torch.from_numpy(target).clamp(min=0)[..., None])[..., 0]
    want = torch.where(torch.from_numpy(target) >= 0, want, torch.nan)
    assert torch.equal(logprob.nan_to_num(7.0), want.nan_to_num(7.0))
    assert torch.equal(entropy, -(lsm.exp() * lsm).sum(-1))
    assert logprob[1, 30:].isnan().all() and not logprob[1, :30].isnan().any()
