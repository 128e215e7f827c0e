// The live balance, two ways behind one interface:
//   - Supabase Realtime (supabase-js): postgres_changes on billing.accounts for this user, after
//     an initial read; every (re)join reads again, since changes during a gap are not replayed.
//   - The service's GET /v1/balance/stream (Server-Sent Events), where there is no Realtime
//     (the local `make dev` stack, a self-hosted Postgres). Read with fetch, not EventSource,
//     so the access token travels in the Authorization header and a 401 can be told apart.
// Both call onBalance with full snapshots, so the newest one always wins.

import type { RealtimeChannel, SupabaseClient } from "@supabase/supabase-js";
import { ApiFailure, failureOf, type Balance, type TokenBillingApi } from "./api";

export type LiveState = "connecting" | "live" | "reconnecting";

export interface LiveHandlers {
  onBalance(balance: Balance): void;
  onState(state: LiveState): void;
  /** The token was refused: the feed stops until the person signs in again. */
  onAuthError(error: ApiFailure): void;
}

export type Stop = () => void;

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

// The service sends a comment every 15 s; three missed ones mean a dead connection.
const SILENCE_MS = 45_000;

interface SseEvent {
  event: string;
  data: string;
}

/** Split a text/event-stream body into events (comments and retry lines are skipped). */
export function parseEvents(buffer: string): { events: SseEvent[]; rest: string } {
  const events: SseEvent[] = [];
  let text = buffer.replace(/\r\n?/g, "\n");
  let end = text.indexOf("\n\n");
  while (end >= 0) {
    const block = text.slice(0, end);
    text = text.slice(end + 2);
    let event = "message";
    const data: string[] = [];
    for (const line of block.split("\n")) {
      if (line === "" || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    if (data.length > 0) events.push({ event, data: data.join("\n") });
    end = text.indexOf("\n\n");
  }
  return { events, rest: text };
}

/** Follow GET /v1/balance/stream, reconnecting with backoff until stopped. */
export function streamBalance(api: TokenBillingApi, handlers: LiveHandlers): Stop {
  let stopped = false;
  let current: AbortController | null = null;

  const follow = async (controller: AbortController): Promise<void> => {
    const response = await fetch(api.url("/v1/balance/stream"), {
      headers: { Accept: "text/event-stream", ...api.headers() },
      cache: "no-store",
      signal: controller.signal,
    });
    if (response.status === 401) throw await failureOf(response);
    if (!response.ok || !response.body) {
      throw new ApiFailure(response.status, "stream_failed", `stream answered ${response.status}`);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let watchdog = setTimeout(() => controller.abort(), SILENCE_MS);
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return; // the service ended the stream (a restart): reconnect
        clearTimeout(watchdog);
        watchdog = setTimeout(() => controller.abort(), SILENCE_MS);
        const parsed = parseEvents(buffer + decoder.decode(value, { stream: true }));
        buffer = parsed.rest;
        for (const { event, data } of parsed.events) {
          if (event === "balance") handlers.onBalance(JSON.parse(data) as Balance);
          else if (event === "status") {
            handlers.onState((JSON.parse(data) as { live: boolean }).live ? "live" : "reconnecting");
          }
        }
      }
    } finally {
      clearTimeout(watchdog);
      reader.cancel().catch(() => undefined);
    }
  };

  const run = async (): Promise<void> => {
    let attempt = 0;
    handlers.onState("connecting");
    while (!stopped) {
      current = new AbortController();
      try {
        await follow(current);
        attempt = 0;
      } catch (error) {
        if (stopped) return;
        if (error instanceof ApiFailure && error.status === 401) {
          handlers.onAuthError(error);
          return;
        }
      }
      if (stopped) return;
      handlers.onState("reconnecting");
      const backoff = Math.min(500 * 2 ** attempt, 10_000);
      attempt += 1;
      await sleep(backoff / 2 + Math.random() * (backoff / 2));
    }
  };

  void run();
  return () => {
    stopped = true;
    current?.abort();
  };
}

interface AccountRow {
  user_id: string;
  balance: number;
  reserved: number;
  plan: string;
  subscription_status: string;
  updated_at: string;
}

export function balanceOfRow(row: AccountRow): Balance {
  return {
    balance: row.balance,
    available: row.balance - row.reserved,
    reserved: row.reserved,
    plan: row.plan,
    subscription_status: row.subscription_status,
  };
}

export interface RealtimeOptions {
  supabaseUrl: string;
  supabaseAnonKey: string;
  userId: string;
  token: () => string | null;
  /** The initial read, and the read after each (re)join. */
  read: () => Promise<Balance>;
}

/** Follow billing.accounts through Supabase Realtime (supabase-js loaded only when used). */
export async function realtimeBalance(options: RealtimeOptions, handlers: LiveHandlers): Promise<Stop> {
  const { createClient } = await import("@supabase/supabase-js");
  // The access token is the page's own (for RLS: a user receives only the own row).
  const supabase: SupabaseClient = createClient(options.supabaseUrl, options.supabaseAnonKey, {
    accessToken: async () => options.token(),
  });
  let version = 0; // bumped by every pushed row: a read that started earlier is stale

  const read = async (): Promise<void> => {
    const started = version;
    try {
      const balance = await options.read();
      if (started === version) handlers.onBalance(balance);
    } catch (error) {
      if (error instanceof ApiFailure && error.status === 401) handlers.onAuthError(error);
    }
  };

  handlers.onState("connecting");
  await read();
  const channel: RealtimeChannel = supabase
    .channel(`token-balance:${options.userId}`)
    .on<AccountRow>(
      "postgres_changes",
      {
        event: "*",
        schema: "billing",
        table: "accounts",
        filter: `user_id=eq.${options.userId}`,
      },
      (payload) => {
        if (payload.eventType === "DELETE") return;
        version += 1;
        handlers.onBalance(balanceOfRow(payload.new));
      },
    )
    .subscribe((status) => {
      switch (String(status)) {
        case "SUBSCRIBED":
          handlers.onState("live");
          void read(); // catch up on anything that changed while (re)joining
          break;
        case "CHANNEL_ERROR":
        case "TIMED_OUT":
          handlers.onState("reconnecting"); // realtime-js rejoins with backoff by itself
          break;
        default:
          break;
      }
    });

  return () => {
    void supabase.removeChannel(channel);
  };
}
