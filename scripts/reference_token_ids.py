"""Token ids of a fixed text from an independent tokenizer, for tests/tokenizer.rs.

Reads the vocabulary and merges of a GGUF with the `gguf` package and tokenizes with the
Hugging Face `tokenizers` package configured like SmolLM2's own tokenizer.json
(Digits(individual) + ByteLevel), not like greater's llama.cpp-style split table.

    pip install gguf tokenizers
    python3 scripts/reference_token_ids.py ~/.cache/greater/models/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import json
import sys

from gguf import GGUFReader
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

TEXT = (
    "Hello world! Grüße aus Zürich, 12345 + 678 = 13023.\n\n  Indented   spaces\tand tabs; "
    "東京は日本の首都です。 Привет, мир! 3.14159 x 2^10 = 1024 🙂 don't isn't"
)


def field_strings(reader, key):
    f = reader.fields[key]
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]


reader = GGUFReader(sys.argv[1])
tokens = field_strings(reader, "tokenizer.ggml.tokens")
merges = [tuple(m.split(" ", 1)) for m in field_strings(reader, "tokenizer.ggml.merges")]
vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}
tok = Tokenizer(models.BPE(vocab, merges))
tok.pre_tokenizer = pre_tokenizers.Sequence(
    [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
)
tok.decoder = decoders.ByteLevel()
ids = tok.encode(TEXT).ids
assert tok.decode(ids) == TEXT
print(json.dumps(ids))
