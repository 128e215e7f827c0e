// useTokenBalance: the signed-in user's token balance in a React component, live through
// Supabase Realtime.
//
//   const { balance, status, error } = useTokenBalance(supabase, session?.user.id ?? null);
//
// It reads public.my_tokens() (through RLS: only the caller's row), then subscribes to
// postgres_changes on billing.accounts filtered to the user. Each (re)join of the channel reads
// again, because changes made while the socket was down are not replayed; a read that started
// before a pushed row is dropped, so the newest balance always wins. Leaving (unmount, or a new
// user) removes the channel.
//
// Needs billing.accounts in the supabase_realtime publication (token-billing's migrations add
// it) and a client signed in as the user, so Realtime applies the row's RLS policy.

import { useEffect, useState } from "react";
import type {
  RealtimePostgresChangesPayload,
  SupabaseClient,
} from "@supabase/supabase-js";

export interface TokenBalance {
  balance: number;
  available: number;
  reserved: number;
  plan: string;
  subscriptionStatus: string;
}

export type TokenBalanceStatus =
  | "idle"
  | "loading"
  | "connecting"
  | "live"
  | "reconnecting"
  | "error";

export interface TokenBalanceState {
  balance: TokenBalance | null;
  status: TokenBalanceStatus;
  error: string | null;
}

/** A row of billing.accounts as Realtime sends it. */
interface AccountRow {
  user_id: string;
  balance: number;
  reserved: number;
  plan: string;
  subscription_status: string;
  updated_at: string;
}

/** A row of public.my_tokens(). */
interface MyTokensRow {
  balance: number;
  available: number;
  reserved: number;
  plan: string;
  subscription_status: string;
}

const IDLE: TokenBalanceState = { balance: null, status: "idle", error: null };

export function useTokenBalance(
  supabase: SupabaseClient,
  userId: string | null,
): TokenBalanceState {
  const [state, setState] = useState<TokenBalanceState>(IDLE);

  useEffect(() => {
    if (!userId) {
      setState(IDLE);
      return;
    }
    let active = true;
    let version = 0;
    setState({ balance: null, status: "loading", error: null });

    const read = async (): Promise<void> => {
      const started = version;
      const { data, error } = await supabase.rpc("my_tokens").maybeSingle<MyTokensRow>();
      if (!active || started !== version) return;
      if (error) {
        setState((s) => ({ ...s, status: "error", error: error.message }));
        return;
      }
      if (!data) {
        setState({ balance: null, status: "error", error: "no token account for this user" });
        return;
      }
      setState((s) => ({
        balance: {
          balance: data.balance,
          available: data.available,
          reserved: data.reserved,
          plan: data.plan,
          subscriptionStatus: data.subscription_status,
        },
        status: s.status === "live" || s.status === "reconnecting" ? s.status : "connecting",
        error: null,
      }));
    };

    const onChange = (payload: RealtimePostgresChangesPayload<AccountRow>): void => {
      if (!active || payload.eventType === "DELETE") return;
      const row = payload.new;
      version += 1;
      setState({
        balance: {
          balance: row.balance,
          available: row.balance - row.reserved,
          reserved: row.reserved,
          plan: row.plan,
          subscriptionStatus: row.subscription_status,
        },
        status: "live",
        error: null,
      });
    };

    // The initial read first, then the subscription.
    const channel = supabase.channel(`token-balance:${userId}`);
    void read().then(() => {
      if (!active) return;
      channel
        .on<AccountRow>(
          "postgres_changes",
          { event: "*", schema: "billing", table: "accounts", filter: `user_id=eq.${userId}` },
          onChange,
        )
        .subscribe((status, err) => {
          if (!active) return;
          switch (String(status)) {
            case "SUBSCRIBED":
              setState((s) => ({ ...s, status: "live" }));
              void read();
              break;
            case "CHANNEL_ERROR":
            case "TIMED_OUT":
              // realtime-js rejoins by itself, with backoff; the next SUBSCRIBED reads again.
              setState((s) => ({ ...s, status: "reconnecting", error: err?.message ?? null }));
              break;
            default:
              break;
          }
        });
    });

    return () => {
      active = false;
      void supabase.removeChannel(channel);
    };
  }, [supabase, userId]);

  return state;
}
