"""Templates of well-known services: the host and the auth shape of each API.

``POST /v1/vaults/{id}/services:from_template`` makes a service of each named
template, with the credential it names (``credential_key``), which must be in
the vault already. The facts are the APIs' own public documentation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kiln.vault.auth import BEARER


@dataclass(frozen=True)
class Template:
    id: str
    name: str
    host: str
    auth_type: str  # bearer | api-key
    credential_key: str
    header: str | None = None  # api-key only
    prefix: str | None = None  # api-key only: text before the value

    def auth_config(self) -> dict[str, Any]:
        if self.auth_type == BEARER:
            return {"type": BEARER, "token": self.credential_key}
        config: dict[str, Any] = {"type": "api-key", "header": self.header, "key": self.credential_key}
        if self.prefix:
            config["prefix"] = self.prefix
        return config

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "host": self.host,
            "auth_type": self.auth_type,
            "credential_key": self.credential_key,
            "auth_config": self.auth_config(),
        }
        if self.header:
            wire["header"] = self.header
        if self.prefix:
            wire["prefix"] = self.prefix
        return wire


def _bearer(id: str, name: str, host: str, key: str) -> Template:
    return Template(id, name, host, BEARER, key)


def _header(id: str, name: str, host: str, key: str, header: str, prefix: str | None = None) -> Template:
    return Template(id, name, host, "api-key", key, header, prefix)


CATALOG: tuple[Template, ...] = (
    _bearer("openai", "OpenAI", "api.openai.com", "OPENAI_API_KEY"),
    _header("anthropic", "Anthropic", "api.anthropic.com", "ANTHROPIC_API_KEY", "x-api-key"),
    _bearer("openrouter", "OpenRouter", "openrouter.ai", "OPENROUTER_API_KEY"),
    _header("gemini", "Google Gemini", "generativelanguage.googleapis.com", "GOOGLE_API_KEY", "x-goog-api-key"),
    _bearer("mistral", "Mistral AI", "api.mistral.ai", "MISTRAL_API_KEY"),
    _bearer("groq", "Groq", "api.groq.com", "GROQ_API_KEY"),
    _bearer("deepseek", "DeepSeek", "api.deepseek.com", "DEEPSEEK_API_KEY"),
    _bearer("together", "Together AI", "api.together.xyz", "TOGETHER_API_KEY"),
    _bearer("perplexity", "Perplexity", "api.perplexity.ai", "PERPLEXITY_API_KEY"),
    _bearer("cohere", "Cohere", "api.cohere.com", "COHERE_API_KEY"),
    _bearer("huggingface", "Hugging Face", "huggingface.co", "HF_TOKEN"),
    _bearer("replicate", "Replicate", "api.replicate.com", "REPLICATE_API_TOKEN"),
    _header("elevenlabs", "ElevenLabs", "api.elevenlabs.io", "ELEVENLABS_API_KEY", "xi-api-key"),
    _bearer("github", "GitHub", "api.github.com", "GITHUB_TOKEN"),
    _bearer("gitlab", "GitLab", "gitlab.com", "GITLAB_TOKEN"),
    _bearer("stripe", "Stripe", "api.stripe.com", "STRIPE_API_KEY"),
    _bearer("slack", "Slack", "slack.com", "SLACK_BOT_TOKEN"),
    _bearer("notion", "Notion", "api.notion.com", "NOTION_API_KEY"),
    _header("linear", "Linear", "api.linear.app", "LINEAR_API_KEY", "Authorization"),
    _bearer("sendgrid", "SendGrid", "api.sendgrid.com", "SENDGRID_API_KEY"),
    _bearer("resend", "Resend", "api.resend.com", "RESEND_API_KEY"),
    _header("brave-search", "Brave Search", "api.search.brave.com", "BRAVE_API_KEY", "X-Subscription-Token"),
    _bearer("tavily", "Tavily", "api.tavily.com", "TAVILY_API_KEY"),
)

BY_ID = {template.id: template for template in CATALOG}
