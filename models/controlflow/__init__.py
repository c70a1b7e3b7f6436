"""A small model with data-dependent control flow: what tracing gets wrong and scripting gets right."""
