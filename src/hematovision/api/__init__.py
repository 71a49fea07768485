"""The service over HTTP (BentoML), one module per job: the service itself (``service``), the request
guard (``guard``), the one error shape (``errors``), who is asking (``auth``), the routes by who uses
them (``account_routes``, ``review_routes``, ``model_routes``, ``ops_routes``), and the service as a
child process for the demo and the tests (``process``)."""
