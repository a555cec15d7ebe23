"""The conversion engine: config translation, parallel plans, streaming conversion, re-sharding."""
