"""Jobs as the API shows them: `routes` (`/v1/jobs`: submit, look, stream, cancel), `answers`
(the shapes of a generation's answer and a job's), `kept_images` (images served by URL for a
while), `webhooks` (which events a job sends) and `webhook_sender` (how they are delivered)."""
