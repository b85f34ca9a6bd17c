"""Talking to ComfyUI: the HTTP/websocket client, API-format graphs, PNG chunks and provenance."""
