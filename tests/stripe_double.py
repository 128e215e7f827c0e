"""A local HTTP double of the Stripe API: a real server in a thread that records every request.

It answers the handful of endpoints the service and the CLI call (customers, checkout sessions,
billing portal sessions, products, prices, and the lists of events, sessions and invoices, paged
as Stripe pages them; for the marketplace, Connect accounts, account links, login links,
destination-charge sessions, transfers and refunds with reverse_transfer) the way Stripe does:
form-encoded requests, JSON objects with `id` and `object`, Stripe's error envelope, and
idempotency (the same Idempotency-Key with the same parameters replays the first response; with
other parameters it is an `idempotency_error`). It can be told to fail the next requests with a
status, to drop the connection, or to do a request and drop the connection before answering (a
timeout after Stripe acted), to exercise the stripe library's retries and the service's error
mapping.
"""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit


@dataclass(frozen=True)
class Recorded:
    """One request as the double received it."""

    method: str
    path: str
    params: dict[str, str]
    idempotency_key: str | None
    authorization: str | None


@dataclass
class Failure:
    status: int  # 0: drop the connection without an answer; -1: do it, then drop (a timeout)
    error_type: str = "api_error"
    code: str | None = None
    message: str = "injected failure"
    path: str | None = None  # only requests to this path; None: any request


@dataclass
class StripeState:
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    products: dict[str, dict[str, Any]] = field(default_factory=dict)
    prices: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    invoices: dict[str, dict[str, Any]] = field(default_factory=dict)
    line_items: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # Saved cards by payment method id: what an off-session confirmation of each does
    # ("succeeded", "card_declined", "authentication_required", "requires_action").
    card_outcomes: dict[str, str] = field(default_factory=dict)
    invoice_items: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Connect: accounts, transfers, refunds, and what each session was asked to charge
    # (payment_intent_data, which Stripe does not echo on the session).
    accounts: dict[str, dict[str, Any]] = field(default_factory=dict)
    transfers: dict[str, dict[str, Any]] = field(default_factory=dict)
    refunds: dict[str, dict[str, Any]] = field(default_factory=dict)
    payment_intent_data: dict[str, dict[str, Any]] = field(default_factory=dict)


def nest(flat: dict[str, str]) -> dict[str, Any]:
    """`{"a[b][0]": "x"}` -> `{"a": {"b": {"0": "x"}}}` (Stripe's form encoding, undone)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.replace("]", "").split("[")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _indexed(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [value[k] for k in sorted(value, key=int)]
    return [] if value is None else [value]


class StripeDouble:
    """Start with `with StripeDouble() as stripe_double:`; point STRIPE_API_BASE at `.url`."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.state = StripeState()
        self._failures: list[Failure] = []
        self._idempotent: dict[str, tuple[str, str, dict[str, str], int, bytes]] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                double._handle(self, "GET")

            def do_POST(self) -> None:
                double._handle(self, "POST")

            def do_DELETE(self) -> None:
                double._handle(self, "DELETE")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # --- lifecycle ----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> StripeDouble:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- test controls ------------------------------------------------------------------------
    def fail_next(
        self,
        status: int,
        *,
        count: int = 1,
        error_type: str = "api_error",
        code: str | None = None,
        message: str = "injected failure",
        path: str | None = None,
    ) -> None:
        """Answer the next `count` requests (to `path`, if given) with this error; status 0
        drops the connection without an answer."""
        with self._lock:
            self._failures.extend(
                Failure(status, error_type, code, message, path) for _ in range(count)
            )

    def drop_next(self, count: int = 1) -> None:
        self.fail_next(0, count=count)

    def drop_answer_next(self, path: str, count: int = 1) -> None:
        """Do the next `count` requests to `path`, then drop the connection before answering:
        Stripe made the object, the client saw a timeout (a retry with the key replays it)."""
        self.fail_next(-1, count=count, path=path)

    def posts(self, path_prefix: str = "") -> list[Recorded]:
        return [r for r in self.requests if r.method == "POST" and r.path.startswith(path_prefix)]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def add_price(self, price_id: str, product_id: str = "prod_test", **fields: Any) -> None:
        self.state.prices[price_id] = {
            "id": price_id,
            "object": "price",
            "product": product_id,
            "active": True,
            "lookup_key": None,
            **fields,
        }

    def save_card(self, customer_id: str, outcome: str = "succeeded") -> str:
        """Give the customer a saved default card (invoice_settings.default_payment_method) whose
        off-session charges end as `outcome`: succeeded, card_declined, authentication_required
        (a 402, as Stripe answers off_session when SCA is needed) or requires_action (a 200
        PaymentIntent waiting for the customer)."""
        method = f"pm_double_{outcome}_{len(self.state.card_outcomes)}"
        with self._lock:
            self.state.card_outcomes[method] = outcome
            customer = self.state.customers[customer_id]
            customer["invoice_settings"] = {"default_payment_method": method}
        return method

    def add_listed(self, obj: dict[str, Any]) -> None:
        """Make an event, Checkout Session, PaymentIntent or invoice (by its `object`) part of
        Stripe's lists."""
        store = {
            "event": self.state.events,
            "checkout.session": self.state.sessions,
            "payment_intent": self.state.sessions,  # where _payment_intent keeps them too
            "invoice": self.state.invoices,
        }[obj["object"]]
        with self._lock:
            store[obj["id"]] = obj

    def add_line_items(self, session_id: str, price_id: str, quantity: int = 1) -> None:
        """A session made elsewhere (a Payment Link, the dashboard): its one line item."""
        self.state.line_items[session_id] = [
            {
                "id": f"li_{session_id}",
                "object": "item",
                "price": self.state.prices[price_id],
                "quantity": quantity,
            }
        ]

    # --- the server side ----------------------------------------------------------------------
    def _new_id(self, prefix: str) -> str:
        return f"{prefix}_double{next(self._ids):06d}"

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        split = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length).decode() if length else ""
        raw = split.query if method == "GET" else body
        params = dict(parse_qsl(raw, keep_blank_values=True))
        key = handler.headers.get("Idempotency-Key")
        recorded = Recorded(method, split.path, params, key, handler.headers.get("Authorization"))
        with self._lock:
            self.requests.append(recorded)
            failure = next((f for f in self._failures if f.path in (None, split.path)), None)
            if failure is not None:
                self._failures.remove(failure)
        if failure is not None and failure.status == -1:
            with self._lock:
                status, answer = self._route(method, split.path, params)
                if method == "POST" and key is not None and status < 500:
                    payload = json.dumps(answer).encode()
                    self._idempotent[key] = (method, split.path, params, status, payload)
            handler.close_connection = True
            handler.connection.shutdown(2)
            return
        if failure is not None and failure.status == 0:
            handler.close_connection = True
            handler.connection.shutdown(2)  # the client sees the connection drop, no answer
            return
        if failure is not None:
            error: dict[str, Any] = {"type": failure.error_type, "message": failure.message}
            if failure.code:
                error["code"] = failure.code
            self._send(handler, failure.status, {"error": error})
            return
        if not (recorded.authorization or "").startswith("Bearer sk_"):
            self._send(handler, 401, _error("invalid_request_error", "Invalid API Key provided"))
            return
        with self._lock:
            if method == "POST" and key is not None and key in self._idempotent:
                first_method, first_path, first_params, status, payload = self._idempotent[key]
                if (first_method, first_path, first_params) != (method, split.path, params):
                    self._send(
                        handler,
                        400,
                        _error(
                            "idempotency_error",
                            "Keys for idempotent requests can only be used with the same "
                            "parameters they were first used with.",
                        ),
                    )
                    return
                self._send_raw(handler, status, payload, replayed=True)
                return
            status, answer = self._route(method, split.path, params)
            payload = json.dumps(answer).encode()
            if method == "POST" and key is not None and status < 500:
                self._idempotent[key] = (method, split.path, params, status, payload)
        self._send_raw(handler, status, payload)

    def _send(self, handler: BaseHTTPRequestHandler, status: int, answer: Any) -> None:
        self._send_raw(handler, status, json.dumps(answer).encode())

    def _send_raw(
        self, handler: BaseHTTPRequestHandler, status: int, payload: bytes, replayed: bool = False
    ) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.send_header("Request-Id", f"req_double{len(self.requests):06d}")
        if replayed:
            handler.send_header("Idempotent-Replayed", "true")
        handler.end_headers()
        handler.wfile.write(payload)

    def _route(self, method: str, path: str, params: dict[str, str]) -> tuple[int, Any]:
        data = nest(params)
        parts = path.strip("/").split("/")
        match (method, parts):
            case ("POST", ["v1", "customers"]):
                customer = {
                    "id": self._new_id("cus"),
                    "object": "customer",
                    "email": data.get("email"),
                    "metadata": data.get("metadata", {}),
                }
                self.state.customers[customer["id"]] = customer
                return 200, customer
            case ("GET", ["v1", "customers", customer_id]):
                if customer_id not in self.state.customers:
                    return _missing("customer", customer_id, 404)
                return 200, self.state.customers[customer_id]
            case ("POST", ["v1", "checkout", "sessions"]):
                return self._checkout(data)
            case ("GET", ["v1", "checkout", "sessions", session_id, "line_items"]):
                if session_id not in self.state.line_items:
                    return _missing("checkout.session", session_id, 404)
                items = self.state.line_items[session_id]
                return 200, {"object": "list", "data": items, "has_more": False, "url": path}
            case ("POST", ["v1", "payment_intents"]):
                return self._payment_intent(data)
            case ("POST", ["v1", "accounts"]):
                account = {
                    "id": self._new_id("acct"),
                    "object": "account",
                    "type": data.get("type"),
                    "email": data.get("email"),
                    "metadata": data.get("metadata", {}),
                    "capabilities": dict.fromkeys(data.get("capabilities", {}), "inactive"),
                    "charges_enabled": False,
                    "payouts_enabled": False,
                    "details_submitted": False,
                }
                self.state.accounts[account["id"]] = account
                return 200, account
            case ("POST", ["v1", "account_links"]):
                account_id = data.get("account", "")
                if account_id not in self.state.accounts:
                    return _missing("account", account_id)
                if data.get("type") not in ("account_onboarding", "account_update"):
                    return 400, _error("invalid_request_error", "Invalid type.", "type")
                return 200, {
                    "object": "account_link",
                    "created": 1_700_000_000,
                    "expires_at": 1_700_000_300,
                    "url": f"https://connect.stripe.com/setup/e/{account_id}/double",
                }
            case ("POST", ["v1", "accounts", account_id, "login_links"]):
                if account_id not in self.state.accounts:
                    return _missing("account", account_id, 404)
                return 200, {
                    "object": "login_link",
                    "created": 1_700_000_000,
                    "url": f"https://connect.stripe.com/express/{account_id}/double",
                }
            case ("POST", ["v1", "transfers"]):
                return self._transfer(data)
            case ("POST", ["v1", "refunds"]):
                return self._refund(data)
            case ("POST", ["v1", "billing_portal", "sessions"]):
                customer_id = data.get("customer", "")
                if customer_id not in self.state.customers:
                    return _missing("customer", customer_id)
                session_id = self._new_id("bps")
                return 200, {
                    "id": session_id,
                    "object": "billing_portal.session",
                    "customer": customer_id,
                    "return_url": data.get("return_url"),
                    "url": f"https://billing.stripe.com/p/session/test_{session_id}",
                }
            case ("GET", ["v1", "products", product_id]):
                if product_id not in self.state.products:
                    return _missing("product", product_id, 404)
                return 200, self.state.products[product_id]
            case ("POST", ["v1", "products"]):
                product_id = data.get("id") or self._new_id("prod")
                if product_id in self.state.products:
                    return 400, _error(
                        "invalid_request_error",
                        f"Product already exists: {product_id}",
                        code="resource_already_exists",
                    )
                product = {
                    "id": product_id,
                    "object": "product",
                    "active": data.get("active", "true") == "true",
                    "name": data.get("name"),
                    "description": data.get("description"),
                    "metadata": data.get("metadata", {}),
                }
                self.state.products[product_id] = product
                return 200, product
            case ("POST", ["v1", "products", product_id]):
                if product_id not in self.state.products:
                    return _missing("product", product_id, 404)
                product = self.state.products[product_id]
                for name in ("name", "description"):
                    if name in data:
                        product[name] = data[name] or None
                if "active" in data:
                    product["active"] = data["active"] == "true"
                product["metadata"] = {**product["metadata"], **data.get("metadata", {})}
                return 200, product
            case ("GET", ["v1", "events"]):
                return self._list(path, self.state.events, data)
            case ("GET", ["v1", "checkout", "sessions"]):
                return self._list(path, self.state.sessions, data, "checkout.session")
            case ("GET", ["v1", "payment_intents"]):
                return self._list(path, self.state.sessions, data, "payment_intent")
            case ("GET", ["v1", "invoices"]):
                return self._list(path, self.state.invoices, data)
            case ("GET", ["v1", "prices"]):
                keys = set(_indexed(data.get("lookup_keys")))
                found = [
                    p
                    for p in self.state.prices.values()
                    if (not keys or p.get("lookup_key") in keys)
                    and ("active" not in data or p["active"] == (data["active"] == "true"))
                ]
                return 200, {"object": "list", "data": found, "has_more": False, "url": path}
            case ("GET", ["v1", "prices", price_id]):
                if price_id not in self.state.prices:
                    return _missing("price", price_id, 404)
                price = dict(self.state.prices[price_id])
                if "product" in _indexed(data.get("expand")):
                    expanded = self.state.products.get(str(price["product"]))
                    price["product"] = expanded or {"id": price["product"], "object": "product"}
                return 200, price
            case ("POST", ["v1", "prices"]):
                return self._create_price(data)
            case ("POST", ["v1", "invoiceitems"]):
                customer_id = data.get("customer", "")
                if customer_id not in self.state.customers:
                    return _missing("customer", customer_id)
                item = {
                    "id": self._new_id("ii"),
                    "object": "invoiceitem",
                    "customer": customer_id,
                    "amount": int(data.get("amount", 0)),
                    "currency": data.get("currency"),
                    "description": data.get("description"),
                    "metadata": data.get("metadata", {}),
                }
                self.state.invoice_items[item["id"]] = item
                return 200, item
            case ("POST", ["v1", "prices", price_id]):
                if price_id not in self.state.prices:
                    return _missing("price", price_id, 404)
                price = self.state.prices[price_id]
                if "active" in data:
                    price["active"] = data["active"] == "true"
                return 200, price
        return 404, _error("invalid_request_error", f"Unrecognized request URL ({method} {path})")

    def _list(
        self,
        path: str,
        store: dict[str, dict[str, Any]],
        data: dict[str, Any],
        kind: str | None = None,
    ) -> tuple[int, Any]:
        """A Stripe list: newest first, `created[gte|gt|lte|lt]` and `status` filters, pages of
        `limit` (default 10, at most 100) continued with `starting_after`."""
        limit = int(data.get("limit", 10))
        if not 1 <= limit <= 100:
            return 400, _error(
                "invalid_request_error",
                "This value must be greater than or equal to 1 and less than or equal to 100.",
                "limit",
            )
        bounds = data.get("created", {})
        compare = {
            "gte": lambda c, b: c >= b,
            "gt": lambda c, b: c > b,
            "lte": lambda c, b: c <= b,
            "lt": lambda c, b: c < b,
        }
        items = [
            obj
            for obj in store.values()
            if (kind is None or obj.get("object") == kind)
            and all(compare[op](int(obj.get("created", 0)), int(v)) for op, v in bounds.items())
            and ("status" not in data or obj.get("status") == data["status"])
        ]
        items.sort(key=lambda obj: (int(obj.get("created", 0)), obj["id"]), reverse=True)
        after = data.get("starting_after")
        if after is not None:
            ids = [obj["id"] for obj in items]
            if after not in ids:
                return _missing("object", after)
            items = items[ids.index(after) + 1 :]
        page = items[:limit]
        return 200, {
            "object": "list",
            "data": page,
            "has_more": len(items) > limit,
            "url": path,
        }

    def _checkout(self, data: dict[str, Any]) -> tuple[int, Any]:
        mode = data.get("mode")
        if mode not in ("payment", "subscription", "setup"):
            return 400, _error("invalid_request_error", "Missing required param: mode.", "mode")
        customer_id = data.get("customer")
        if customer_id is not None and customer_id not in self.state.customers:
            return _missing("customer", customer_id)
        items = _indexed(data.get("line_items"))
        for item in items:
            if "price_data" in item:
                # An inline price (a marketplace listing): a one-off price of its own.
                inline = item["price_data"]
                price_id = self._new_id("price")
                self.state.prices[price_id] = {
                    "id": price_id,
                    "object": "price",
                    "active": True,
                    "currency": inline.get("currency"),
                    "unit_amount": int(inline.get("unit_amount", 0)),
                    "product_data": inline.get("product_data", {}),
                    "type": "one_time",
                }
                item["price"] = price_id
            price_id = item.get("price")
            if price_id not in self.state.prices:
                return _missing("price", price_id)
            price = self.state.prices[price_id]
            if mode == "subscription" and not price.get("recurring"):
                return 400, _error(
                    "invalid_request_error",
                    "You must provide at least one recurring price in `subscription` mode.",
                )
        intent_data = data.get("payment_intent_data", {})
        destination = intent_data.get("transfer_data", {}).get("destination")
        if destination is not None and destination not in self.state.accounts:
            return _missing("account", destination)
        session_id = self._new_id("cs_test")
        prices = [self.state.prices[item.get("price")] for item in items]
        fee = intent_data.get("application_fee_amount")
        total = sum(
            int(price.get("unit_amount") or 0) * int(item.get("quantity") or 1)
            for price, item in zip(prices, items, strict=True)
        )
        if fee is not None and not 0 <= int(fee) <= total:
            return 400, _error(
                "invalid_request_error",
                "The application fee amount must be at most the charge amount.",
                "payment_intent_data[application_fee_amount]",
            )
        self.state.payment_intent_data[session_id] = intent_data
        session = {
            "id": session_id,
            "object": "checkout.session",
            "mode": mode,
            "customer": customer_id,
            "client_reference_id": data.get("client_reference_id"),
            "metadata": data.get("metadata", {}),
            "success_url": data.get("success_url"),
            "cancel_url": data.get("cancel_url"),
            "status": "open",
            "payment_status": "unpaid",
            "amount_total": sum(
                int(price.get("unit_amount") or 0) * int(item.get("quantity") or 1)
                for price, item in zip(prices, items, strict=True)
            ),
            "currency": prices[0].get("currency", "usd") if prices else "usd",
            "livemode": False,
            "url": f"https://checkout.stripe.com/c/pay/{session_id}",
        }
        self.state.line_items[session_id] = [
            {
                "id": f"li_{session_id}_{n}",
                "object": "item",
                "price": price,
                "quantity": int(item.get("quantity") or 1),
            }
            for n, (price, item) in enumerate(zip(prices, items, strict=True))
        ]
        self.state.sessions[session_id] = session
        return 200, session

    def _payment_intent(self, data: dict[str, Any]) -> tuple[int, Any]:
        """The fields of openapi-fixtures3/payment_intent.json that a new PaymentIntent has."""
        amount = data.get("amount", "")
        if not amount.isdigit() or not data.get("currency"):
            return 400, _error("invalid_request_error", "Missing required param: amount.", "amount")
        customer_id = data.get("customer")
        if customer_id is not None and customer_id not in self.state.customers:
            return _missing("customer", customer_id)
        intent_id = self._new_id("pi")
        intent = {
            "id": intent_id,
            "object": "payment_intent",
            "amount": int(amount),
            "amount_received": 0,
            "currency": data["currency"],
            "customer": customer_id,
            "metadata": data.get("metadata", {}),
            "status": "requires_payment_method",
            "client_secret": f"{intent_id}_secret_{intent_id[-8:]}",
            "livemode": False,
        }
        self.state.sessions[intent_id] = intent
        if data.get("confirm") == "true":
            return self._confirm(intent, data)
        return 200, intent

    def _confirm(self, intent: dict[str, Any], data: dict[str, Any]) -> tuple[int, Any]:
        """An immediate confirmation with a saved card (off_session: no customer present)."""
        method = data.get("payment_method")
        outcome = self.state.card_outcomes.get(str(method))
        if outcome is None:
            return _missing("payment_method", str(method))
        intent["payment_method"] = method
        if outcome == "succeeded":
            intent.update(status="succeeded", amount_received=intent["amount"])
            return 200, intent
        if outcome == "requires_action" and data.get("off_session") != "true":
            intent["status"] = "requires_action"
            return 200, intent
        code = "card_declined" if outcome == "card_declined" else "authentication_required"
        intent["status"] = "requires_payment_method"
        intent["last_payment_error"] = {"type": "card_error", "code": code}
        error = _error("card_error", "Your card was declined.", code=code)
        error["error"]["payment_intent"] = intent
        if code == "card_declined":
            error["error"]["decline_code"] = "generic_decline"
        return 402, error

    def _transfer(self, data: dict[str, Any]) -> tuple[int, Any]:
        amount = data.get("amount", "")
        if not amount.isdigit() or int(amount) < 1 or not data.get("currency"):
            return 400, _error("invalid_request_error", "Missing required param: amount.", "amount")
        destination = data.get("destination", "")
        if destination not in self.state.accounts:
            return _missing("account", destination)
        transfer = {
            "id": self._new_id("tr"),
            "object": "transfer",
            "amount": int(amount),
            "amount_reversed": 0,
            "currency": data["currency"],
            "destination": destination,
            "metadata": data.get("metadata", {}),
            "reversals": {"object": "list", "data": [], "has_more": False},
            "reversed": False,
            "source_transaction": data.get("source_transaction"),
            "livemode": False,
        }
        self.state.transfers[transfer["id"]] = transfer
        return 200, transfer

    def _refund(self, data: dict[str, Any]) -> tuple[int, Any]:
        intent = data.get("payment_intent")
        if not intent:
            return 400, _error(
                "invalid_request_error", "Missing required param: payment_intent.", "payment_intent"
            )
        reverse = data.get("reverse_transfer") == "true"
        refund_id = self._new_id("re")
        refund = {
            "id": refund_id,
            "object": "refund",
            "amount": int(data["amount"]) if "amount" in data else None,
            "payment_intent": intent,
            "status": "succeeded",
            "metadata": data.get("metadata", {}),
            "transfer_reversal": f"trr_{refund_id[3:]}" if reverse else None,
            "refund_application_fee": data.get("refund_application_fee") == "true",
        }
        self.state.refunds[refund_id] = refund
        return 200, refund

    def _create_price(self, data: dict[str, Any]) -> tuple[int, Any]:
        product_id = data.get("product")
        if product_id not in self.state.products:
            return _missing("product", str(product_id))
        lookup_key = data.get("lookup_key")
        if lookup_key:
            holders = [p for p in self.state.prices.values() if p.get("lookup_key") == lookup_key]
            if holders and data.get("transfer_lookup_key") != "true":
                return 400, _error(
                    "invalid_request_error",
                    f"A price (`{holders[0]['id']}`) already uses that lookup key.",
                    code="lookup_key_exists",
                )
            for holder in holders:
                holder["lookup_key"] = None
        recurring = data.get("recurring")
        price = {
            "id": self._new_id("price"),
            "object": "price",
            "active": True,
            "product": product_id,
            "currency": data.get("currency"),
            "unit_amount": int(data["unit_amount"]) if "unit_amount" in data else None,
            "lookup_key": lookup_key,
            "recurring": (
                {"interval": recurring.get("interval"), "interval_count": 1} if recurring else None
            ),
            "type": "recurring" if recurring else "one_time",
            "metadata": data.get("metadata", {}),
        }
        self.state.prices[price["id"]] = price
        return 200, price


def _error(
    error_type: str, message: str, param: str | None = None, *, code: str | None = None
) -> dict[str, Any]:
    error: dict[str, Any] = {"type": error_type, "message": message}
    if param:
        error["param"] = param
    if code:
        error["code"] = code
    return {"error": error}


def _missing(kind: str, object_id: str, status: int = 400) -> tuple[int, Any]:
    """Stripe answers 404 for a missing object in the path, 400 for one named in a param."""
    return status, _error(
        "invalid_request_error", f"No such {kind}: '{object_id}'", code="resource_missing"
    )
