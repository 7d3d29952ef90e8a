"""Chat templates in the formats of real model families, written here for the tests.

LLAMA3_TEMPLATE reproduces the `chat_template` of Meta-Llama-3-8B-Instruct's
tokenizer_config.json (bos_token first, `<|start_header_id|>role<|end_header_id|>\\n\\n`,
content trimmed, `<|eot_id|>` after every message). QWEN25_TEMPLATE reproduces Qwen2.5-Instruct's
ChatML template without its tool-calling branches (`<|im_start|>role\\n content <|im_end|>\\n`,
a default system prompt when the conversation has none, no BOS). Both use `{%- -%}` whitespace
control and `loop`, as the originals do.
"""

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")

QWEN25_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Qwen2.5's special tokens (ids follow the BPE ranks in this order).
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CONVERSATION = [
    {"role": "system", "content": "You are terse. Answer in one line."},
    {"role": "user", "content": "Name a colour of the sky 🌤 (天空)?"},
    {"role": "assistant", "content": "Blue, mostly."},
    {"role": "user", "content": "And at night?\nBe brief."},
    {"role": "assistant", "content": "Black.\n\nSometimes <|end|> dark blue."},
]
