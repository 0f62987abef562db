"""Labeled demo dataset: customer-support tickets routed to a closed set of queues.

The stand-in teacher answers from this dataset, so the demo's "frontier model" is always right and
the student has something real to learn. Tickets are generated from templates with a seeded RNG so
every run sees the same data; the queue names are the company's internal ones, which a base model
cannot guess from general knowledge.

Every template carries at least one detail (an order number, a name, a product, …): two tickets that differ only
in greeting are one request to decontamination, which keeps every copy of a held-out request out of training, so
a template without details could end up with no training pair at all and the hold-out would measure guessing on
it (docs/benchmarks.md, session 16).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SYSTEM_PROMPT = "Route the support ticket to one queue. Answer with the queue name only."

QUEUES: dict[str, list[str]] = {
    "fin-ops": [
        "I was charged twice for my {plan} subscription this month.",
        "My invoice {ref} shows the wrong amount, please correct it.",
        "Why did my card get billed {amount} when my plan costs less?",
        "Please refund the duplicate payment on invoice {ref}.",
        "The VAT number on invoice {ref} is missing, I need it fixed.",
        "I want to switch from monthly to annual billing on the {plan} plan.",
        "Your system charged {amount} to my old credit card instead of the new one.",
        "Can I get a receipt for the payment of {amount}?",
    ],
    "l2-platform": [
        "The app crashes every time I open the {feature} page.",
        "I get error {code} when I try to sync my data.",
        "The API returns a 500 error on the {feature} endpoint since this morning.",
        "Exports of {feature} to CSV hang at 99 percent and never finish.",
        "The dashboard is very slow and times out after {minutes} minutes.",
        "Webhooks stopped firing for our {feature} integration.",
        "Login works but the {feature} screen stays blank.",
        "After the last update the mobile app freezes for {minutes} minutes on startup.",
    ],
    "logistics": [
        "My order {ref} has not arrived after {days} days.",
        "The tracking number for order {ref} does not work.",
        "Order {ref} was delivered to the wrong address.",
        "Can you change the delivery address for order {ref}?",
        "The courier left my parcel with the {product} outside and it got wet.",
        "My shipment is stuck in customs for {days} days.",
        "Order {ref} arrived with one item missing from the box.",
        "When will my back-ordered {product} ship?",
    ],
    "iam": [
        "{name} cannot log in, the password reset email never arrives.",
        "The account of {name} is locked after too many attempts.",
        "Please enable two-factor authentication for our {seats} users.",
        "{name} lost their phone and cannot get the 2FA codes.",
        "How do I change the email address on the account of {name}?",
        "Remove {name} from our workspace, they left the company.",
        "The single sign-on with our identity provider fails for {name}.",
        "I need admin rights for {name} on our organisation.",
    ],
    "rma": [
        "I want to return the {product} I bought last week.",
        "The {product} arrived broken, I want a replacement.",
        "How do I send back a defective {product}?",
        "My {product} stopped working after {days} days, is it under warranty?",
        "Please send me a return label for order {ref}.",
        "The {product} is the wrong size, I want to exchange it.",
        "I returned the {product} {days} days ago and have not heard back.",
        "Can I return an opened {product}?",
    ],
    "growth": [
        "We are a team of {seats} people, what discount can you offer?",
        "I would like a demo of the enterprise plan for our {seats} people.",
        "Do you offer a nonprofit discount on the {plan} plan?",
        "Can we get a quote for {seats} seats with priority support?",
        "What is the difference between the {plan} and enterprise plans?",
        "We want to upgrade our whole department from the {plan} plan, who can I talk to?",
        "Is there a trial of the {plan} plan for larger teams?",
        "I am interested in reselling your {product} in my country.",
    ],
}

_FILLERS = {
    "plan": ["Basic", "Pro", "Team", "Premium", "Starter"],
    "ref": ["A-1043", "B-2291", "C-7720", "#55812", "#90217", "INV-3390", "ORD-4471"],
    "amount": ["$49", "$120", "$19.99", "EUR 75", "$310"],
    "feature": ["reports", "billing settings", "analytics", "calendar", "inbox", "projects"],
    "code": ["E401", "ERR_TIMEOUT", "0x80070005", "500", "SYNC-12"],
    "minutes": ["2", "5", "10", "15"],
    "days": ["3", "7", "10", "14", "21"],
    "name": ["Alice", "Bob", "Priya", "Chen", "Maria", "Tom"],
    "product": ["headphones", "keyboard", "monitor", "laptop stand", "webcam", "charger"],
    "seats": ["15", "40", "120", "300", "25"],
}

_OPENERS = ["", "Hi, ", "Hello team, ", "Urgent: ", "Hey, ", "Good morning. "]
_CLOSERS = ["", " Thanks.", " Please help.", " Thank you!", " Any update?", ""]


@dataclass(frozen=True)
class Ticket:
    """One support ticket and the queue the teacher routes it to."""

    text: str
    queue: str

    def messages(self) -> list[dict[str, str]]:
        """The chat request an application sends for this ticket."""
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": self.text},
        ]


def _fill(template: str, rng: random.Random) -> str:
    return template.format(**{key: rng.choice(values) for key, values in _FILLERS.items()})


def generate_tickets(count: int, seed: int = 7) -> list[Ticket]:
    """Return `count` tickets, balanced across queues, in a seeded random order."""
    rng = random.Random(seed)
    queues = sorted(QUEUES)
    tickets = []
    for index in range(count):
        queue = queues[index % len(queues)]
        body = _fill(rng.choice(QUEUES[queue]), rng)
        tickets.append(Ticket(text=f"{rng.choice(_OPENERS)}{body}{rng.choice(_CLOSERS)}", queue=queue))
    rng.shuffle(tickets)
    return tickets
