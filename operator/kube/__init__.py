"""The Kubernetes side: the API client (client.py), the API's names and formats (api.py), the
view kopf's watches feed (cache.py), a watch's listing again (relists.py), Events (events.py)."""
