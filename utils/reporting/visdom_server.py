"""A visdom server that needs no internet: `python -m utils.visdom_server -port 8097`.

`python -m visdom.server` downloads its page's scripts from CDNs at every start and dies offline;
without them the page stays blank. This wrapper puts the scripts in visdom's static folder from
what the install already brought (the files vendored in utils/reporting/visdom_static, plotly.js from the
plotly package), then runs visdom's own server, which takes the same options (-port, -env_path, ...).
It also mends the page's template for tornado >= 6.6, whose static_url refuses the template's link
to the user's style sheet outside the static folder (the page answered 403). The page's optional
extras (MathJax for LaTeX text, d3 for network graphs) are left out.
"""

import filecmp
import shutil
from pathlib import Path

import plotly
from visdom.server import run_server
from visdom.utils.shared_utils import get_visdom_path

from utils.errors import InputError

VENDORED = Path(__file__).with_name("visdom_static")
PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
# The same address, built without static_url: the prefix ends in /static/, the user's sheet is at /user/.
USER_STYLE = '{{ static_url("../user/style.css") }}'
USER_STYLE_LINK = '"{{ handler.settings.get("static_url_prefix", "/static/") }}../user/style.css"'


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
        index.write_text(index.read_text().replace(USER_STYLE, USER_STYLE_LINK))
    except OSError as error:
        raise InputError(
            f"cannot install visdom's web page scripts into {static}: {error}; "
            "make that folder writable (it is inside the virtual environment)"
        ) from error


def main() -> None:
    try:
        install_assets(Path(get_visdom_path("static")))
    except InputError as error:
        raise SystemExit(str(error)) from None
    run_server.main()  # parses visdom's own options from sys.argv; never downloads


if __name__ == "__main__":
    main()
