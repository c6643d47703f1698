"""The web dashboard the gateway serves at `/ui`: jobs, models, artifacts and a chat playground.

`routes.install` adds the routes; `views` builds their JSON from the services' gRPC replies,
`metrics_scrape` the models' live figures from the inference service's Prometheus metrics, `watches`
streams a job's events; `static/` holds the page (plain HTML, CSS and JavaScript, uPlot vendored).
"""

from fastserve.services.gateway.dashboard.metrics_scrape import MetricsScraper
from fastserve.services.gateway.dashboard.routes import install
from fastserve.services.gateway.dashboard.views import Upstreams

__all__ = ["MetricsScraper", "Upstreams", "install"]
