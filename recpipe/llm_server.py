"""llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`), loading its model the way
recpipe's local backend does: without llama.cpp's extra CPU buffer types where its AMX backend would crash
quantised GGUFs (see `recpipe.llm.llama.extra_buffer_types`). Same arguments as llama_cpp.server:

    python -m recpipe.llm_server --model SmolLM2-135M-Instruct.Q4_1.gguf --port 8000

then `recpipe describe --llm openai --base-url http://127.0.0.1:8000/v1`.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from llama_cpp.server.__main__ import main as serve
    except ImportError:
        sys.exit("error: needs llama-cpp-python[server] (pip install 'recpipe[local-llm]')")
    from recpipe.llm.llama import extra_buffer_types, llama_load_params

    with llama_load_params(use_extra_bufts=extra_buffer_types()):  # the model loads inside serve()
        serve()


if __name__ == "__main__":
    main()
