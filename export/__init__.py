"""Training and export (torch lives here, never on the serving path).

`export_module` is imported on first use, so that the torch-free parts (`graph_bundle`, `cost`) stay torch-free.
"""


def __getattr__(name: str):
    if name == "export_module":
        from rnnserve.export.module_export import export_module

        return export_module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
