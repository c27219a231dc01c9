"""A visdom server that needs no internet: `python -m utils.visdom_server -port 8097`.

`python -m visdom.server` downloads its page's scripts from CDNs at every start and dies offline;
without them the page stays blank. This wrapper puts the scripts in visdom's static folder from
what the install already brought (the files vendored in utils/reporting/visdom_static, plotly.js from the
plotly package), then runs visdom's own server, which takes the same options (-port, -env_path, ...).
It also mends the page's template for tornado >= 6.6, whose static_url refuses the template's link
to the user's style sheet outside the static folder (the page answered 403). The page's optional
extras, MathJax for LaTeX text and d3 with saveSvgAsPng for network graphs, are not installed, and the mended page
does not ask for them (each would be a 404 and a console error): our runs draw neither, visdom's main.js calls d3
only in its network pane and never MathJax, and plotly uses MathJax only if it is there (LaTeX shows as typed).

The server listens on 127.0.0.1 only: whoever reaches its port reads every curve and writes, replaces and
deletes environments, so `--host ADDRESS` (e.g. 0.0.0.0) widens it only on request, with a warning; an SSH
tunnel to 127.0.0.1 is the safer way to watch from another machine. Request bodies are capped at MAX_BODY
(visdom's own server takes up to 1 GiB).
"""

import argparse
import filecmp
import ipaddress
import shutil
import sys
from pathlib import Path

import plotly
from visdom.server import run_server
from visdom.server.app import Application
from visdom.utils.shared_utils import get_visdom_path

from utils.errors import InputError

VENDORED = Path(__file__).with_name("visdom_static")
PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
# The same address, built without static_url: the prefix ends in /static/, the user's sheet is at /user/.
USER_STYLE = '{{ static_url("../user/style.css") }}'
USER_STYLE_LINK = '"{{ handler.settings.get("static_url_prefix", "/static/") }}../user/style.css"'
# The template's lines that load the optional extras (and configure MathJax), dropped from the page.
EXTRAS = (
    "js/mathjax/",
    "text/x-mathjax-config",
    "js/d3.v3.min.js",
    "js/d3-selection-multi.v1.js",
    "js/saveSvgAsPng.js",
)


def asset_sources() -> dict[str, Path]:
    """Each file the page loads, by its path under visdom's static folder, and where it comes from."""
    sources = {f"{path.parent.name}/{path.name}": path for path in VENDORED.glob("*/*")}
    sources["js/plotly-plotly.min.js"] = PLOTLY_JS
    return sources


def install_assets(static: Path) -> None:
    """Copies the page's scripts and styles into static, leaving files already identical alone."""
    try:
        for relative, source in asset_sources().items():
            target = static / relative
            if not target.exists() or not filecmp.cmp(source, target, shallow=False):
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
        index = static / "index.html"
        index.write_text(mended_page(index.read_text()))
    except OSError as error:
        raise InputError(
            f"cannot install visdom's web page scripts into {static}: {error}; "
            "make that folder writable (it is inside the virtual environment)"
        ) from error


def mended_page(template: str) -> str:
    """visdom's page template linking the user's style sheet as tornado >= 6.6 allows, without the extras."""
    lines = template.replace(USER_STYLE, USER_STYLE_LINK).splitlines(keepends=True)
    return "".join(line for line in lines if not any(extra in line for extra in EXTRAS))


LOOPBACK = "127.0.0.1"
# A logged window (a figure, a grid of images) is a few megabytes: a bigger body is a mistake or an attack.
MAX_BODY = 64 << 20


def split_host(argv: list[str]) -> tuple[str, list[str]]:
    """Our --host option, and the rest of argv for visdom's own parser."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--host", default=LOOPBACK)
    known, rest = parser.parse_known_args(argv)
    if "-bind_local" in rest and not is_loopback(known.host):
        raise InputError(f"-bind_local contradicts --host {known.host}: drop one of them")
    return known.host, rest


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return host == "localhost"


def bound_to(host: str) -> type[Application]:
    """visdom's Application, listening on host only and refusing bodies over MAX_BODY."""

    class BoundApplication(Application):
        def listen(self, port: int, address: str | None = None, **kwargs) -> None:
            # visdom's start_server asks for every interface (without -bind_local) and 1 GiB bodies.
            super().listen(port, address=host, max_buffer_size=MAX_BODY, max_body_size=MAX_BODY)

    return BoundApplication


def main() -> None:
    try:
        host, visdom_argv = split_host(sys.argv[1:])
        install_assets(Path(get_visdom_path("static")))
    except InputError as error:
        raise SystemExit(str(error)) from None
    if not is_loopback(host):
        print(
            f"WARNING: the visdom server listens on {host}: anyone who reaches its port reads every curve and "
            "writes, replaces and deletes environments; leave --host out (127.0.0.1) and use an SSH tunnel instead",
            file=sys.stderr,
        )
    run_server.Application = bound_to(host)  # start_server builds the Application it finds in its module
    sys.argv[1:] = visdom_argv
    run_server.main()  # parses visdom's own options from sys.argv; never downloads


if __name__ == "__main__":
    main()
