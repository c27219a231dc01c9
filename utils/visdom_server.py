"""`python -m utils.visdom_server`: the offline visdom server (utils/reporting/visdom_server.py)."""

from utils.reporting.visdom_server import main

if __name__ == "__main__":
    main()
