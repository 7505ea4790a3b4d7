"""The persona-vector method: trait artifacts, sampled-and-judged responses, extraction,
steering evaluation, monitoring, projection, fine-tuning shift and data flagging."""
