-- One deduct_tokens_batch of 32 debits of 1 on random accounts of :first..:last (an account may
-- appear twice), a fresh key each: the batch's own cost, without the client's coalescer.
select count(*) from public.deduct_tokens_batch((
  select jsonb_agg(jsonb_build_object(
    'user_id', lpad(to_hex((random() * (:last::integer - :first::integer))::integer + :first::integer), 32, '0')::uuid,
    'amount', 1,
    'idempotency_key', gen_random_uuid()::text
  ))
  from generate_series(1, 32)
));
