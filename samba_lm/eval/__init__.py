"""Evaluations: perplexity against context length, passkey retrieval, phonebook lookup.

Every result file carries `run_record(...)`: the model config, a hash of the weights and the command."""

from .record import run_record, write_json

__all__ = ["run_record", "write_json"]
