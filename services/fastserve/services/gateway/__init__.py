"""The OpenAI-compatible HTTP gateway: `/v1/models`, `/v1/chat/completions`, `/v1/completions` and
`/v1/embeddings` over the inference service's gRPC API, through the client package only."""
