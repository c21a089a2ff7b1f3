"""A scriptable stand-in for a masked LM: logits come from a Python function of the canvas, and every
call is recorded. It lets tests pin down the sampler's exact behaviour (which logits it sees, which
positions it may commit) without depending on a trained model."""

from types import SimpleNamespace

import torch


class FakeMaskedLM(torch.nn.Module):
    def __init__(self, vocab_size, logits_fn, max_position_embeddings=512):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, 1)
        self.config = SimpleNamespace(max_position_embeddings=max_position_embeddings, vocab_size=vocab_size)
        self.logits_fn = logits_fn
        self.calls = []

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None):
        self.calls.append((input_ids.clone(), None if attention_mask is None else attention_mask.clone()))
        logits = self.logits_fn(input_ids, attention_mask).to(torch.float32)
        assert logits.shape == (*input_ids.shape, self.embed.num_embeddings)
        return SimpleNamespace(logits=logits)


class FakeTokenizer:
    """Just the ids the sampler reads (mmBERT's layout); decode/encode are not needed by these tests."""

    pad_token_id, eos_token_id, bos_token_id, unk_token_id, mask_token_id = 0, 1, 2, 3, 4
