"""Tests of glmv.server: the OpenAI-compatible API, in process and against a real server."""
