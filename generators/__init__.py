"""pairforge generators: layouts (label maps at physical size) and render backends, with registries by name."""
from generators.base import (Backend, Renderer, available_renderers, get_backend, register_layout,
                             register_renderer)

__all__ = ["Backend", "Renderer", "available_renderers", "get_backend", "register_layout", "register_renderer"]
