"""imagerecognize-gateway: a caching, quota-enforcing proxy for the ImageRecognize v2 API."""

__version__ = "0.1.0"
