"""Live curves on a visdom server."""

import visdom

from utils.errors import InputError


class VisdomLogger:
    """Appends points to named curves, one visdom window per plot title."""

    def __init__(self, port: int, server: str = "http://127.0.0.1", env: str = "main") -> None:
        self.vis = visdom.Visdom(server=server, port=port, env=env, raise_exceptions=False)
        if not self.vis.check_connection(timeout_seconds=5):
            raise InputError(f"no visdom server answers at {server}:{port}: start one with "
                             f"`python -m visdom.server -port {port}`, or leave visdom_port unset")
        self.env = env
        self.windows: dict[str, str] = {}

    def __call__(self, name: str, title: str, x: float, y: float) -> None:
        window = self.windows.get(title)
        self.windows[title] = self.vis.line(X=[x], Y=[y], win=window, name=name,
                                            update="append" if window else None,
                                            opts={"title": title, "showlegend": True})
