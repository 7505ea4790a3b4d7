"""Llama-3.1-8B-Instruct, trait sycophantic, layer 16 of 32 (the paper's second model)."""
from configs import base


def get_config():
    c = base.get_config()
    c.model = "meta-llama/Llama-3.1-8B-Instruct"
    c.traits = ("sycophantic",)
    c.steer.layers = (16,)
    c.monitor.layer = 16
    return c
