"""The OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models, plus
TGI's /chat_tokenize and SageMaker's /invocations (see `routes`)."""

from tgi.server.openai.routes import router, v1_router

__all__ = ["router", "v1_router"]
