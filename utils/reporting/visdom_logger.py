"""Live curves on a visdom server."""

import requests
import visdom

from utils.errors import InputError


def server_answers(url: str, timeout: float = 5.0) -> bool:
    try:
        requests.get(url, timeout=timeout)
    except requests.RequestException:
        return False
    return True


class VisdomLogger:
    """Appends points to named curves, one visdom window per plot title."""

    def __init__(self, port: int, server: str = "http://127.0.0.1", env: str = "main") -> None:
        # Ask first: without a server, visdom's client prints tracebacks and polls for seconds before failing.
        if not server_answers(f"{server}:{port}"):
            raise InputError(
                f"no visdom server answers at {server}:{port}: start one with "
                f"`python -m utils.visdom_server -port {port}` (offline), or leave visdom_port unset"
            )
        self.vis = visdom.Visdom(server=server, port=port, env=env, raise_exceptions=False)
        self.env = env
        self.windows: dict[str, str] = {}

    def __call__(self, name: str, title: str, x: float, y: float) -> None:
        window = self.windows.get(title)
        self.windows[title] = self.vis.line(
            X=[x],
            Y=[y],
            win=window,
            name=name,
            update="append" if window else None,
            opts={"title": title, "showlegend": True},
        )
