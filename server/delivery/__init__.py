"""Delivery: encoding results, the file store (results and uploads) and webhooks."""
