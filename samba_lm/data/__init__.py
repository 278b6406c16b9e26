"""The data pipeline: sources -> byte-level BPE tokenizer -> memory-mapped token shards -> block loader.

    build_shards("shakespeare", "data/shakespeare", vocab_size=4096)      # once
    shards = TokenShards("data/shakespeare")
    loader = BlockLoader(shards.split("train"), seq_len=512, seed=0)
    batch = loader.next_batch(global_batch=16)                            # [16, 513] int64
"""

from .loader import BlockLoader
from .shards import TokenShards, TokenStream, build_shards
from .sources import SOURCES, ReadLog, iter_documents
from .tokenizer import EOS, eos_id, load_tokenizer, train_tokenizer

__all__ = ["EOS", "SOURCES", "BlockLoader", "ReadLog", "TokenShards", "TokenStream", "build_shards", "eos_id",
           "iter_documents", "load_tokenizer", "train_tokenizer"]
