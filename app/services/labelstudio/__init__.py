"""The home's Label Studio: its server, project and webhook (``home``), the tasks sent to it with the
active version's proposal (``tasks``), and the database side of the webhook and the sync (``sink``)."""
