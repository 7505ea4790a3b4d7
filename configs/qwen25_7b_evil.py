"""The paper's main setting: Qwen2.5-7B-Instruct, trait evil, layer 20 of 28, GPT-4.1-mini judge."""
from configs import base


def get_config():
    c = base.get_config()
    c.model = "Qwen/Qwen2.5-7B-Instruct"
    c.dtype = "bfloat16"
    c.traits = ("evil",)
    c.steer.layers = (20,)
    c.steer.coefs = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5)
    c.monitor.layer = 20
    return c
