"""A ChatML chat template and its special tokens, for the tiny chat models the chat and gateway tests build."""

IM_START, IM_END, EOS = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
ORDER_ERROR = "only the first message may be a system message"
CHATML = ("{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
          "{{ raise_exception('" + ORDER_ERROR + "') }}{% endif %}"
          "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
