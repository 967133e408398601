"""The Ray Serve application, for serve config files: `import_path: serve.app:build_app`.

    serve run serve/config.yaml            # from the repository root
    serve run serve.app:build_app package=/path/to/package device=cpu

The application lives in fedray.serving; this file only gives it the path Serve imports.
"""

from fedray.serving import build_app

__all__ = ["build_app"]
